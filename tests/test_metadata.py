"""Asset metadata a person can read: rounded floats, visible non-finite values, table schemas."""

import math

import polars as pl
from dagster import TableSchemaMetadataValue, TextMetadataValue

from assets.metadata import readable, table_metadata


def test_floats_are_rounded_to_four_significant_digits_and_nan_is_text():
    out = readable({"fvu": 0.16234567, "tokens_per_second": 3625.1234, "tiny": 1.23456e-7, "n": 121700,
                    "ok": True, "bad": math.nan, "zero": 0.0, "label": "x"})
    assert out["fvu"] == 0.1623 and out["tokens_per_second"] == 3625.0 and out["tiny"] == 1.235e-7
    assert out["n"] == 121700 and out["ok"] is True and out["zero"] == 0.0 and out["label"] == "x"
    assert isinstance(out["bad"], TextMetadataValue) and out["bad"].value == "nan"


def test_tables_carry_row_count_and_column_schema():
    meta = table_metadata(pl.DataFrame({"feature": [1, 2], "density": [0.5, 0.25], "kind": ["top", "random"]}))
    assert meta["dagster/row_count"] == 2
    schema = meta["dagster/column_schema"]
    assert isinstance(schema, TableSchemaMetadataValue)
    assert [(c.name, c.type) for c in schema.schema.columns] == [("feature", "int"), ("density", "float"),
                                                                ("kind", "string")]
