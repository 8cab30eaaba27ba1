"""Asset metadata a person can read on the asset page: rounded numbers, table schemas, pictures."""

import base64
import math

import polars as pl
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

SIGNIFICANT_DIGITS = 4


def readable(metadata: dict) -> dict:
    """Floats rounded to 4 significant digits (the UI shows them with thousands separators, as it does
    ints); non-finite floats as text, so a NaN is seen rather than plotted; everything else as is."""
    return {key: _readable(value) for key, value in metadata.items()}


def _readable(value):
    if isinstance(value, bool) or not isinstance(value, float):
        return value
    if not math.isfinite(value):
        return MetadataValue.text(str(value))
    if value == 0:
        return 0.0
    return round(value, max(0, SIGNIFICANT_DIGITS - 1 - int(math.floor(math.log10(abs(value))))))


def inline_png_url(png: bytes) -> str:
    """``png`` as a data URL: a picture inside a page or Markdown, with no file to serve."""
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


def inline_png(png: bytes, title: str) -> MetadataValue:
    """A picture shown on the asset page itself (Markdown with a data URL)."""
    return MetadataValue.md(f"![{title}]({inline_png_url(png)})")


_DAGSTER_TYPES = {pl.Int64: "int", pl.Int32: "int", pl.Int16: "int", pl.Float64: "float", pl.Float32: "float",
                  pl.Utf8: "string", pl.Boolean: "bool"}


def dagster_types(schema: dict) -> dict[str, str]:
    """The Dagster column types (int, float, string, bool, …) of a polars schema (name -> dtype)."""
    return {name: _DAGSTER_TYPES.get(dtype, str(dtype)) for name, dtype in schema.items()}


def column_schema(schema: dict) -> MetadataValue:
    """``dagster/column_schema`` from a polars schema (name -> dtype)."""
    return MetadataValue.table_schema(TableSchema(columns=[
        TableColumn(name, kind) for name, kind in dagster_types(schema).items()]))


def table_metadata(frame: pl.DataFrame) -> dict:
    """The standard table entries Dagster's catalog shows: row count and column schema."""
    return {"dagster/row_count": frame.height, "dagster/column_schema": column_schema(dict(frame.schema))}


def table_preview(rows: list[dict], columns: dict[str, str]) -> MetadataValue:
    """A small table rendered on the asset page; ``columns``: name -> Dagster type."""
    return MetadataValue.table(records=[TableRecord(row) for row in rows],
                               schema=TableSchema(columns=[TableColumn(n, t) for n, t in columns.items()]))
