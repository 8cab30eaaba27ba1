"""One SAE's features in Neuronpedia's import layout, written from the feature tables in one step.

Neuronpedia (neuronpedia.org, github.com/hijohnnylin/neuronpedia) imports a source (one SAE) from
the folder its own exporter and its SAEDashboard converter write
(``utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py``)::

    <modelId>/<sourceId>/                   sourceId = "<layer>-<sourceSetName>"
        release.jsonl model.jsonl sourceset.jsonl source.jsonl     one record each
        features/batch-<n>.jsonl.gz         one Feature record a line
        activations/batch-<n>.jsonl.gz      one Activation (an example window) a line
        explanations/batch-<n>.jsonl.gz     one Explanation a line
        saelens/cfg.json, sae_weights.safetensors    the SAELens weights the source points to

Every record has exactly the fields of Neuronpedia's database records (``db_models/*.py``),
transcribed with their types in ``neuronpedia_fields.json`` (its source named inside), and is
checked against it and against the invariants below before anything is written
(``check_record``); the whole layout is one committed version of ``neuronpedia/<sae_name>``.

From our tables (``sae_platform.tables``):

=====================================  ===============================================================
Feature ``maxActApprox``               feature_stats.max (activation units at the SAE's hook point)
``frac_nonzero``                       feature_stats.density
``freq_hist_data_bar_heights/values``  feature_stats.histogram: the counts of its non-empty bins and
                                       each bin's centre (geometric; the underflow bin's: half its top)
``pos_str/values``, ``neg_str/values``  logit effects: top and bottom tokens by W_dec · W_U
``topkCosSimIndices/Values``           explanations.neighbors / neighbor_cosines (decoder cosine)
``vector``, ``hookName``               the SAELens export's W_dec row (raw units) and the hook point
                                       its reconstruction belongs at; ``vectorDefaultSteerStrength``
                                       = maxActApprox, as Neuronpedia's converter sets it
Activation ``tokens``, ``values``      a context window (feature_contexts): token strings and the
                                       feature on every token (0 where a token has no stored row:
                                       start tokens and sinks, as the converter zeroes BOS)
``qualifyingTokenIndex``               the example token (the window's centre)
``binMin``, ``binMax``, ``binContains``  the interval the example was sampled from: an interval
                                       example's [j·max/n, (j+1)·max/n) (its share unrecorded: null);
                                       a random example's (0, max], all activating tokens (1.0); a
                                       top example: null, as Neuronpedia's top activations
``dataSource``, ``dataIndex``          the activation partition and the row in it
Explanation                            the N2G explanation (precision and recall in ``notes``) and
                                       the LLM explanations when there are some
=====================================  ===============================================================

Left empty (we compute no such figure): neuron alignment, correlated neurons and features
(Pearson), the logit histogram, DFA and loss values.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources

import numpy as np
import polars as pl
from safetensors.numpy import load as load_safetensors

from sae_platform.browser.generate import histogram_bin_edges
from sae_platform.catalog import (
    LLM_EXPLANATIONS_FILE,
    LOGIT_EFFECTS,
    NEURONPEDIA_SAELENS,
    HookEntry,
    checkpoint_pin,
    checkpoint_version,
    contexts_name,
    explanations_name,
    export_name,
    is_current,
    llm_explanations_name,
    logits_name,
    neuronpedia_batch_file,
    neuronpedia_name,
    neuronpedia_source_dir,
    tables_name,
)
from sae_platform.contexts import read_feature_contexts
from sae_platform.errors import PlatformError
from sae_platform.export import CFG_FILENAME, WEIGHTS_FILENAME, export_run
from sae_platform.feature_intervals import interval_bounds
from sae_platform.feature_merge import read_tables
from sae_platform.hooks import parse_hook_point
from sae_platform.metrics import read_explanations
from sae_platform.tables import (
    ACTS,
    BOTTOM_SCORES,
    BOTTOM_TOKEN_STRS,
    CENTER,
    DENSITY,
    EXPLANATION,
    FEATURE,
    HISTOGRAM,
    INTERVAL,
    KIND,
    KIND_INTERVAL,
    KIND_RANDOM,
    MAX,
    NEIGHBOR_COSINES,
    NEIGHBORS,
    PARTITION,
    PRECISION,
    RANK,
    RECALL,
    ROW,
    TOKEN_STRS,
    TOP_SCORES,
    TOP_TOKEN_STRS,
)

FIELDS_FILE = "neuronpedia_fields.json"
SINGLE_RECORDS = ("release", "model", "sourceset", "source")  # <kind>.jsonl, one record each
RECORD_KIND = {"features": "feature", "activations": "activation", "explanations": "explanation"}  # of a batch
FEATURES_PER_BATCH = 128      # features per batch file; a feature's activations share its batch number
CREATOR_ID = "sae-platform"   # creatorId / authorId: Neuronpedia maps it to a user when importing
N2G_TYPE, LLM_TYPE = "sae-platform-n2g", "sae-platform-llm-detection"  # Explanation.typeName
ID_CHARS = 25                 # record ids: as long as Neuronpedia's cuids


class NeuronpediaError(PlatformError):
    """A record that does not match Neuronpedia's definition (names the record and the field)."""


# -- the field definitions ------------------------------------------------------------------------

@cache
def field_definitions() -> dict:
    """``neuronpedia_fields.json``: {"source": where the fields were read, "records": {kind: {"file",
    "fields": {name: {"type", "required", "nullable"}}}}} for kind in feature, activation,
    explanation, model, source, sourceset, release."""
    return json.loads(resources.files("sae_platform").joinpath(FIELDS_FILE).read_text())


_SCALARS = {"str": str, "int": int, "bool": bool, "float": int | float}  # int: a JSON number without a point


def _type_ok(value, type_name: str) -> bool:
    """Whether ``value`` is a ``type_name`` of ``neuronpedia_fields.json`` (str, int, bool, float,
    datetime, list[...]): floats finite, datetimes ISO 8601, a bool neither an int nor a float."""
    return _checker(type_name)(value)


@cache
def _checker(type_name: str):
    """``_type_ok`` for one type, resolved once: an export checks ~16 fields of ~1 million records."""
    if type_name.startswith("list["):
        item = type_name[5:-1]
        return lambda value: isinstance(value, list) and _items_ok(value, item)
    if type_name == "datetime":
        return lambda value: isinstance(value, str) and _is_iso(value)
    if type_name == "float":
        return lambda value: (isinstance(value, int | float) and not isinstance(value, bool)
                              and math.isfinite(value))
    scalar = _SCALARS[type_name]
    if type_name == "int":
        return lambda value: isinstance(value, int) and not isinstance(value, bool)
    return lambda value: isinstance(value, scalar)


def _items_ok(items: list, type_name: str) -> bool:
    """Whether every item is a ``type_name`` (``_type_ok``), at C speed for lists of scalars: an export
    checks ~60 million list items (window values and tokens, decoder rows), one at a time it took minutes."""
    if type_name not in _SCALARS:
        return all(map(_checker(type_name), items))
    allowed = _SCALARS[type_name]
    if not all(issubclass(t, allowed) and (t is not bool or type_name == "bool") for t in set(map(type, items))):
        return False  # a bool is an int to Python, not to Neuronpedia
    return type_name != "float" or all(map(math.isfinite, items))


def _is_iso(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


@cache
def _record_rules(kind: str) -> tuple[frozenset, tuple, dict]:
    """(its field names, the required ones, {name: (type name, nullable, checker)}) of a ``kind`` record."""
    spec = field_definitions()["records"][kind]["fields"]
    return (frozenset(spec), tuple(n for n, f in spec.items() if f["required"]),
            {n: (f["type"], f["nullable"], _checker(f["type"])) for n, f in spec.items()})


def check_record(kind: str, record: dict, where: str = "") -> dict:
    """``record`` when it has exactly the fields Neuronpedia's ``kind`` record declares, each of its
    declared type (floats finite, datetimes ISO 8601, null only where Optional), and meets its
    invariants (``_invariants``); NeuronpediaError naming ``where``, the field and the rule otherwise."""
    names, required, fields = _record_rules(kind)
    label = f"{kind} record{' ' + where if where else ''}"
    if not names.issuperset(record) or not all(n in record for n in required):
        unknown, missing = sorted(set(record) - names), sorted(n for n in required if n not in record)
        raise NeuronpediaError(f"{label} has unknown fields {unknown} and lacks required fields {missing}",
                               f"write exactly the fields of Neuronpedia's {kind} record ({FIELDS_FILE})")
    for name, value in record.items():
        type_name, nullable, ok = fields[name]
        if value is None and nullable:
            continue
        if value is None or not ok(value):
            raise NeuronpediaError(f"{label}: {name} = {repr(value)[:80]} is not {type_name}"
                                   f"{' or null' if nullable else ''}",
                                   f"write {name} as Neuronpedia's {kind} record declares it ({FIELDS_FILE})")
    for problem in _invariants(kind, record):
        raise NeuronpediaError(f"{label}: {problem}", "rebuild the feature tables and contexts, then export again")
    return record


def _invariants(kind: str, r: dict) -> Iterator[str]:
    """What a record's values must satisfy beyond their types."""
    if kind == "activation":
        values = r["values"]
        if not values or len(values) != len(r["tokens"]):
            yield f"{len(values)} values for {len(r['tokens'])} tokens"
            return
        if r["maxValue"] != max(values) or r["minValue"] != min(values):
            yield f"maxValue {r['maxValue']} / minValue {r['minValue']} are not the values' max / min"
        if values[r["maxValueTokenIndex"]] != r["maxValue"] if 0 <= r["maxValueTokenIndex"] < len(values) else True:
            yield f"maxValueTokenIndex {r['maxValueTokenIndex']} does not hold maxValue"
        q = r.get("qualifyingTokenIndex")
        if q is not None and not 0 <= q < len(values):
            yield f"qualifyingTokenIndex {q} is outside the {len(values)} tokens"
        low, high, share = r.get("binMin"), r.get("binMax"), r.get("binContains")
        if (low is None) != (high is None) or (low is not None and not 0 <= low <= high):
            yield f"the interval [{low}, {high}] is not an interval of activations"
        if share is not None and not 0 <= share <= 1:
            yield f"binContains {share} is not a fraction"
    elif kind == "feature":
        if not r["maxActApprox"] >= 0 or not 0 <= r["frac_nonzero"] <= 1:
            yield f"maxActApprox {r['maxActApprox']} < 0 or frac_nonzero {r['frac_nonzero']} not in [0, 1]"
        for a, b in (("pos_str", "pos_values"), ("neg_str", "neg_values"), ("topkCosSimIndices", "topkCosSimValues"),
                     ("freq_hist_data_bar_heights", "freq_hist_data_bar_values")):
            if len(r[a]) != len(r[b]):
                yield f"{a} has {len(r[a])} entries and {b} {len(r[b])}"
        if r["hasVector"] != bool(r["vector"]):
            yield f"hasVector is {r['hasVector']} with a vector of {len(r['vector'])} values"


# -- ids ------------------------------------------------------------------------------------------

def slug(text: str) -> str:
    """Lowercase letters, digits, '.' and '-' (Neuronpedia's ids appear in its URLs)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9.-]", "-", text.lower())).strip("-.") or "x"


@dataclass(frozen=True)
class ExportIds:
    """Who the records belong to on Neuronpedia: the model, the source set (our SAE) and its layer."""

    model_id: str       # e.g. "smollm2-135m": the last segment of the model's source, slugged
    source_set: str     # the SAE's name, slugged
    layer: int          # the block of the SAE's hook point
    release: str = "sae-platform"
    created_at: str = ""

    @property
    def source_id(self) -> str:
        """``<layer>-<sourceSetName>``: Neuronpedia's source id, the ``layer`` of every feature record."""
        return f"{self.layer}-{self.source_set}"


def export_ids(model_source: str, sae_name: str, layer: int, created_at: str | None = None) -> ExportIds:
    """The ids of SAE ``sae_name`` read at block ``layer`` of the model loaded from ``model_source``."""
    return ExportIds(slug(str(model_source).rstrip("/").rsplit("/", 1)[-1]), slug(sae_name), int(layer),
                     created_at=created_at or datetime.now(UTC).isoformat())


def record_id(*parts) -> str:
    """A stable id for a record (the same example gets the same id at every export): "c" and the
    first hex digits of the sha256 of its parts' ``str`` joined by NUL, ``ID_CHARS`` characters."""
    return _hashed_id("\0".join(map(str, parts)).encode())


def _hashed_id(key: bytes) -> str:
    return "c" + hashlib.sha256(key).hexdigest()[:ID_CHARS - 1]


def record_ids(frame: pl.DataFrame, *parts: pl.Expr | str | int) -> pl.Series:
    """``record_id`` of every row of ``frame`` [n] (String): ``parts`` are expressions of its integer
    or string columns (null written "None", as ``str`` writes it) or constants. The keys are built
    on the frame; only the sha256 runs a row at a time (~0.5 us a row)."""
    key = pl.concat_str([(p if isinstance(p, pl.Expr) else pl.lit(str(p))).cast(pl.String).fill_null("None")
                         for p in parts], separator="\0")
    keys = frame.select(key.cast(pl.Binary)).to_series().to_list()
    return pl.Series("id", [_hashed_id(k) for k in keys], pl.String)


# -- records --------------------------------------------------------------------------------------

def _floats(values) -> list[float]:
    return values.tolist() if isinstance(values, np.ndarray) else [float(v) for v in values]


def histogram_bars(histogram: list[int], bin_edges: list[float | None]) -> tuple[list[float], list[float]]:
    """(heights, values) of an activation histogram's non-empty bins: the count and the bin's centre
    (geometric for positive edges; half the top of a bin from 0; the overflow bin's lower edge)."""
    heights, values = [], []
    for count, low, high in zip(histogram, bin_edges[:-1], bin_edges[1:], strict=True):
        if count:
            heights.append(float(count))
            values.append(float(low if high is None else high / 2 if not low else math.sqrt(low * high)))
    return heights, values


def feature_record(ids: ExportIds, stat: dict, bin_edges: list[float | None], *, logits: dict | None,
                   explanation: dict | None, vector: np.ndarray | None, hook_name: str) -> dict:
    """One feature's Feature record from its feature_stats row (``stat``), its logit effects and
    explanations rows (or None) and its decoder row ``vector`` [d_model] in raw units (or None)."""
    heights, values = histogram_bars(stat[HISTOGRAM], bin_edges)
    neighbours = [(int(i), float(c)) for i, c in zip(explanation[NEIGHBORS] or [], explanation[NEIGHBOR_COSINES] or [],
                                                  strict=True) if i >= 0 and math.isfinite(c)] if explanation else []
    max_act = float(stat[MAX])
    record = {"modelId": ids.model_id, "layer": ids.source_id, "index": str(stat[FEATURE]), "creatorId": CREATOR_ID,
              "createdAt": ids.created_at, "maxActApprox": max_act, "hasVector": vector is not None,
              "vector": [] if vector is None else _floats(vector), "vectorLabel": None,
              "vectorDefaultSteerStrength": max_act, "hookName": hook_name,
              "topkCosSimIndices": [i for i, _ in neighbours], "topkCosSimValues": [c for _, c in neighbours],
              "pos_str": list(logits[TOP_TOKEN_STRS]) if logits else [],
              "pos_values": _floats(logits[TOP_SCORES]) if logits else [],
              "neg_str": list(logits[BOTTOM_TOKEN_STRS]) if logits else [],
              "neg_values": _floats(logits[BOTTOM_SCORES]) if logits else [],
              "frac_nonzero": float(stat[DENSITY]),
              "freq_hist_data_bar_heights": heights, "freq_hist_data_bar_values": values}
    return {**record, **{name: [] for name in _unfilled_lists(tuple(record))}}


@cache
def _unfilled_lists(filled: tuple[str, ...]) -> list[str]:
    """The list fields of a Feature record that ``filled`` lacks (sorted): written empty."""
    return sorted(name for name, f in field_definitions()["records"]["feature"]["fields"].items()
                  if f["type"].startswith("list") and name not in filled)


def sampled_interval(windows: pl.DataFrame, n_intervals: int) -> pl.DataFrame:
    """binMin, binMax, binContains (float64 or null) of each of ``windows`` (``export_windows`` rows
    with their feature's ``MAX``): the interval of activations it was drawn from (module docstring)."""
    low, high = interval_bounds(windows[MAX].to_numpy(), n_intervals, windows[INTERVAL].fill_null(0).to_numpy())
    kind = pl.col(KIND)
    return windows.select(
        binMin=pl.when(kind == KIND_INTERVAL).then(pl.Series(low)).when(kind == KIND_RANDOM).then(0.0),
        binMax=pl.when(kind == KIND_INTERVAL).then(pl.Series(high))
        .when(kind == KIND_RANDOM).then(pl.col(MAX).cast(pl.Float64)),
        binContains=pl.when(kind == KIND_RANDOM).then(1.0).otherwise(pl.lit(None, pl.Float64)))


def export_windows(contexts: pl.DataFrame) -> pl.DataFrame:
    """A shard's feature_contexts as the Activation records read them, in export order (feature, then
    kind, interval and rank, nulls last): only the columns they read, ``acts`` as float64 with 0.0
    where a token has no finite value (start tokens, sinks), null token strings as ""."""
    finite = pl.element().is_finite()
    return contexts.select(
        FEATURE, KIND, INTERVAL, RANK, PARTITION, ROW, CENTER,
        pl.col(TOKEN_STRS).list.eval(pl.element().fill_null("")).fill_null([]),
        pl.col(ACTS).cast(pl.List(pl.Float64)).list.eval(pl.when(finite).then(pl.element()).otherwise(0.0))
        .fill_null([]),
    ).sort(FEATURE, KIND, INTERVAL, RANK, nulls_last=True, maintain_order=True)


def check_windows(windows: pl.DataFrame) -> pl.DataFrame:
    """``windows`` (``export_windows``) when every window makes an Activation record ``check_record``
    accepts: as many values as tokens (at least one), its example token among them, a partition, a
    row, and an interval number (>= 0) for an interval example. NeuronpediaError naming the first
    window that does not, as ``check_record`` would."""
    n_values, n_tokens = pl.col(ACTS).list.len(), pl.col(TOKEN_STRS).list.len()
    problems = pl.concat_str([
        pl.when((n_values != n_tokens) | (n_values == 0)).then(
            pl.format("{} values for {} tokens", n_values, n_tokens)),
        pl.when(~pl.col(CENTER).is_between(0, n_values - 1)).then(
            pl.format("qualifyingTokenIndex {} is outside the {} tokens", pl.col(CENTER).fill_null(-1), n_values)),
        pl.when(pl.col(PARTITION).is_null() | pl.col(ROW).is_null()).then(pl.lit("dataSource or dataIndex is null")),
        pl.when((pl.col(KIND) == KIND_INTERVAL) & ~(pl.col(INTERVAL) >= 0).fill_null(False)).then(
            pl.format("interval {} is not an interval number", pl.col(INTERVAL).fill_null(-1))),
    ], separator="; ", ignore_nulls=True)
    bad = windows.lazy().with_columns(problem=problems).filter(pl.col("problem") != "").head(1).collect()
    if bad.height:
        w = bad.row(0, named=True)
        raise NeuronpediaError(f"activation record of feature {w[FEATURE]} ({w[KIND]} example {w[RANK]}): "
                               f"{w['problem']}", "rebuild the feature tables and contexts, then export again")
    return windows


@dataclass(frozen=True)
class ActivationLines:
    """One feature's Activation records: ``lines`` their JSON (UTF-8, one record a line, each ending in
    a newline, in ``export_windows`` order), ``first``: (kind, rank) of its first window."""

    lines: bytes
    first: tuple[str, int]


def activation_lines(ids: ExportIds, windows: pl.DataFrame, stats: pl.DataFrame,
                     n_intervals: int) -> dict[int, ActivationLines]:
    """{feature: its Activation records} of the ``check_windows``-ed ``windows`` (``export_windows``,
    at least one value each) of the features of ``stats`` (feature_stats: each one's max), built
    and encoded to JSON on the frame: a record at a time in Python cost ~30 us (~27 s of the demo's
    16k-feature export; a million features make ~55 million records). Per window, in this order: id
    (``record_ids``), tokens, index, layer, modelId, maxValue (the FIRST maximum, as
    ``values.index(max(values))`` finds it), maxValueTokenIndex, minValue (the first minimum, as
    ``min``), values, creatorId, dataSource, dataIndex, createdAt, binMin, binMax, binContains
    (``sampled_interval``), qualifyingTokenIndex. Floats are written as polars spells them (shortest
    round trip, e.g. ``1e-7``), no spaces: the same values as json.dumps wrote."""
    frame = windows.join(stats.select(FEATURE, MAX), on=FEATURE, how="inner", maintain_order="left")
    frame = frame.with_columns(record_ids(frame, ids.model_id, ids.source_id, pl.col(FEATURE), pl.col(KIND),
                                          pl.col(INTERVAL), pl.col(RANK)), *sampled_interval(frame, n_intervals))
    values = pl.col(ACTS)
    # + 0.0 makes -0.0 a 0.0: zeros of either sign tie, as Python's max and min see them, where polars
    # may order -0.0 below 0.0; arg_max / arg_min give the first of ties, the value keeps its sign
    top, bottom = (values + 0.0).list.arg_max(), (values + 0.0).list.arg_min()
    record = pl.struct(
        id=pl.col("id"), tokens=pl.col(TOKEN_STRS), index=pl.col(FEATURE).cast(pl.String), layer=pl.lit(ids.source_id),
        modelId=pl.lit(ids.model_id), maxValue=values.list.get(top), maxValueTokenIndex=top.cast(pl.Int64),
        minValue=values.list.get(bottom), values=values, creatorId=pl.lit(CREATOR_ID), dataSource=pl.col(PARTITION),
        dataIndex=pl.col(ROW).cast(pl.String), createdAt=pl.lit(ids.created_at), binMin=pl.col("binMin"),
        binMax=pl.col("binMax"), binContains=pl.col("binContains"), qualifyingTokenIndex=pl.col(CENTER).cast(pl.Int64))
    per_feature = (frame.select(FEATURE, KIND, RANK, line=record.struct.json_encode() + "\n")
                   .group_by(FEATURE, maintain_order=True)
                   .agg(pl.col("line").str.join("").cast(pl.Binary), pl.col(KIND).first(), pl.col(RANK).first()))
    return {f: ActivationLines(lines, (kind, rank)) for f, lines, kind, rank in per_feature.iter_rows()}


def explanation_records(ids: ExportIds, n2g: dict | None, llm: Iterable[dict], explainer: str | None) -> list[dict]:
    """A feature's Explanation records: its N2G explanation (when it has one) and its LLM ones."""
    out = []
    if n2g and n2g.get(EXPLANATION):
        notes = f"N2G on held-out text: precision {n2g[PRECISION]}, recall {n2g[RECALL]}"
        out.append(_explanation(ids, n2g[FEATURE], n2g[EXPLANATION], N2G_TYPE, None, notes))
    for row in llm:
        if row.get(EXPLANATION) and row.get("error") is None:
            notes = f"detection balanced accuracy {row['balanced_accuracy']:.3f} on held-out text"
            out.append(_explanation(ids, row[FEATURE], row[EXPLANATION], LLM_TYPE, explainer, notes))
    return out


def _explanation(ids: ExportIds, feature: int, text: str, type_name: str, model: str | None, notes: str) -> dict:
    return {"id": record_id(ids.model_id, ids.source_id, feature, type_name), "modelId": ids.model_id,
            "layer": ids.source_id, "index": str(feature), "description": text, "authorId": CREATOR_ID,
            "typeName": type_name, "explanationModelName": model, "notes": notes, "createdAt": ids.created_at}


def single_records(ids: ExportIds, *, d_model: int, hook_name: str, saelens_cfg: dict | None,
                   ctx_len: int | None, description: str) -> dict[str, dict]:
    """The release, model, source set and source records of one export (``SINGLE_RECORDS``)."""
    created = ids.created_at
    return {
        "release": {"name": ids.release, "description": "SAEs trained and described by sae-platform",
                    "creatorName": CREATOR_ID, "creatorId": CREATOR_ID, "descriptionShort": "sae-platform",
                    "creatorNameShort": CREATOR_ID, "urls": [], "createdAt": created},
        "model": {"id": ids.model_id, "instruct": False, "creatorId": CREATOR_ID, "displayNameShort": ids.model_id,
                  "displayName": ids.model_id, "dimension": int(d_model), "createdAt": created, "updatedAt": created},
        "sourceset": {"modelId": ids.model_id, "name": ids.source_set, "creatorId": CREATOR_ID,
                      "visibility": "PUBLIC", "description": description, "creatorName": CREATOR_ID,
                      "releaseName": ids.release, "createdAt": created},
        "source": {"id": ids.source_id, "modelId": ids.model_id, "setName": ids.source_set, "creatorId": CREATOR_ID,
                   "hasDashboards": True, "inferenceEnabled": False,
                   "saelensConfig": None if saelens_cfg is None else json.dumps(saelens_cfg),
                   "visibility": "PUBLIC", "num_tokens_in_prompt": ctx_len,
                   "notes": f"hook point {hook_name}; SAELens weights: {NEURONPEDIA_SAELENS}/ beside these records"
                            if saelens_cfg is not None else f"hook point {hook_name}; no SAELens equivalent",
                   "createdAt": created},
    }


@dataclass
class ShardTables:
    """One feature shard's tables, as the feature stages committed them (``sae_platform.tables``)."""

    stats: pl.DataFrame
    contexts: pl.DataFrame
    hist_bin_edges: list[float]     # the tables' meta: the histogram's bin edges
    n_intervals: int                # the tables' meta: equal-width intervals of (0, max]
    logits: pl.DataFrame | None = None
    explanations: pl.DataFrame | None = None
    llm_explanations: pl.DataFrame | None = None
    llm_explainer: str | None = None


def _by_feature(frame: pl.DataFrame | None) -> dict[int, dict]:
    return {} if frame is None else {row[FEATURE]: row for row in frame.iter_rows(named=True)}


def shard_records(ids: ExportIds, shard: ShardTables, *, hook_name: str,
                  W_dec: np.ndarray | None) -> Iterator[tuple[dict, bytes, list[dict]]]:
    """Per feature of the shard, in feature order: (Feature, its Activations as JSON lines
    (``activation_lines``; b"" when it has none), its Explanations), each checked: Features,
    Explanations and each feature's first Activation record (parsed back) by record
    (``check_record``), every window's values on the whole frame first (``check_windows``: the rest
    of an Activation's fields and types are fixed by ``activation_lines`` and ``export_windows``'s
    dtypes; checking ~1 million of them one by one cost a fifth of the export).
    ``W_dec`` [n_latents, d_model]: the SAELens decoder (raw units), or None."""
    edges = histogram_bin_edges(shard.hist_bin_edges, shard.stats)
    logits, n2g = _by_feature(shard.logits), _by_feature(shard.explanations)
    llm = {} if shard.llm_explanations is None else shard.llm_explanations.partition_by(FEATURE, as_dict=True)
    activations = activation_lines(ids, check_windows(export_windows(shard.contexts)), shard.stats, shard.n_intervals)
    for stat in shard.stats.sort(FEATURE).iter_rows(named=True):
        f = stat[FEATURE]
        feature = check_record("feature", feature_record(
            ids, stat, edges, logits=logits.get(f), explanation=n2g.get(f), hook_name=hook_name,
            vector=None if W_dec is None else W_dec[f]), f"of feature {f}")
        acts = activations.get(f)
        if acts:
            kind, rank = acts.first
            check_record("activation", json.loads(acts.lines[:acts.lines.index(b"\n")]),
                         f"of feature {f} ({kind} example {rank})")
        llm_rows = [] if (f,) not in llm else llm[(f,)].to_dicts()
        expl = [check_record("explanation", e, f"of feature {f}")
                for e in explanation_records(ids, n2g.get(f), llm_rows, shard.llm_explainer)]
        yield feature, acts.lines if acts else b"", expl


# gzip level 1: on the demo's 1.2 GB of JSON lines (json.dumps's spacing, as measured) 3.5x less CPU than level 5
# (~9 s instead of ~32 s) for 14% more bytes (~285 MB instead of 249 MB; 277.7 MB since the lines are compact
# JSON, 2026-12-07); the JSON lines are the same at every level
GZIP_LEVEL = 1


_POLARS_TYPES = {"str": pl.String, "datetime": pl.String, "int": pl.Int64, "float": pl.Float64, "bool": pl.Boolean}


@cache
def _polars_type(type_name: str) -> pl.DataType:
    """The polars dtype of a ``neuronpedia_fields.json`` type: ``list[float]`` is List(Float64)."""
    return pl.List(_polars_type(type_name[5:-1])) if type_name.startswith("list[") else _POLARS_TYPES[type_name]


def _jsonl(kind: str, records: list[dict]) -> bytes:
    """``kind`` records (``check_record``-ed: finite floats; each with the fields of the first, in its
    order) as JSON lines (UTF-8, non-ASCII kept), encoded by polars as ``activation_lines`` are, each
    field of its declared type: Python's json spent ~1.2 s on a demo shard's 4,096 Feature records
    (their decoder rows: 2.4 million floats), polars ~0.5 s."""
    if not records:
        return b""
    names = records[0].keys()
    if any(r.keys() != names for r in records):  # a frame would drop the fields the first lacks, null the others
        raise ValueError(f"{kind} records with different fields: each must have the fields of the first")
    _, _, fields = _record_rules(kind)
    frame = pl.DataFrame(records, schema={name: _polars_type(fields[name][0]) for name in records[0]})
    return frame.select(pl.struct(pl.all()).struct.json_encode().str.join("\n")).item().encode() + b"\n"


def _gz(data: bytes) -> bytes:
    """``data`` gzipped, the same bytes at every run (mtime 0)."""
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)


def write_export(store, sae_name: str, ids: ExportIds, shards: Iterable[ShardTables], *, hook_name: str,
                 d_model: int, ctx_len: int | None, saelens: dict[str, bytes] | None, pin: dict,
                 inputs: dict | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Commit ``neuronpedia/<sae_name>``: the records of every feature of ``shards`` in Neuronpedia's
    layout (module docstring), ``FEATURES_PER_BATCH`` features a batch, and the SAELens files
    ``saelens`` ({file name: bytes}: ``export.CFG_FILENAME`` and ``WEIGHTS_FILENAME``; None: no
    SAELens equivalent, features get no vector). ``pin``: the checkpoint the tables describe. All or
    nothing: a record that fails ``check_record`` raises NeuronpediaError before the commit.
    ``inputs``: the versions of the artifacts read (``input_versions``), recorded in the pointer.
    ``log``: called with one line per shard (its features, windows, bytes written and seconds): an
    export of 16k features takes a while. Returns counts, ``bytes`` (all files written), ``seconds``
    (wall), the source folder and the committed path."""
    started = time.perf_counter()
    cfg, W_dec = None, None
    if saelens is not None:
        cfg = json.loads(saelens[CFG_FILENAME])
        W_dec = load_safetensors(saelens[WEIGHTS_FILENAME])["W_dec"]
    singles = single_records(ids, d_model=d_model, hook_name=hook_name, saelens_cfg=cfg, ctx_len=ctx_len,
                             description=f"sae-platform SAE {sae_name} at {hook_name}")
    counts = {"features": 0, "activations": 0, "explanations": 0, "batches": 0, "bytes": 0}
    source = neuronpedia_source_dir(ids.model_id, ids.source_id)
    # gzip and the writes of a batch run on a thread (zlib and the file system release the GIL) while the
    # next batch's records are built (about a third of the time); one batch in flight, its errors raised
    with store.writing(neuronpedia_name(sae_name), model_id=ids.model_id, source_id=ids.source_id,
                       inputs=inputs or {}, **pin) as version, ThreadPoolExecutor(1) as writer:
        base = f"{version}/{source}"
        in_flight: list[Future] = []

        def write(path: str, data: bytes) -> None:
            store.write_bytes_atomic(f"{base}/{path}", data)
            counts["bytes"] += len(data)

        for kind, record in singles.items():
            write(f"{kind}.jsonl", (json.dumps(check_record(kind, record)) + "\n").encode())
        for name, data in (saelens or {}).items():
            write(f"{NEURONPEDIA_SAELENS}/{name}", data)
        # features and explanations: records; activations: each feature's JSON lines (activation_lines)
        batch: dict[str, list] = {k: [] for k in RECORD_KIND}

        def settle():
            """Wait for the batch in flight (its bytes counted), raising what its writing raised."""
            while in_flight:
                in_flight.pop().result()

        def flush():
            files = {}
            for kind, records in batch.items():
                lines = b"".join(records) if kind == "activations" else _jsonl(RECORD_KIND[kind], records)
                files[neuronpedia_batch_file(kind, counts["batches"])] = lines
                counts[kind] += lines.count(b"\n")
                records.clear()
            counts["batches"] += 1
            settle()
            in_flight.append(writer.submit(lambda: [write(path, _gz(data)) for path, data in files.items()]))

        for number, shard in enumerate(shards):
            shard_started, bytes_before = time.perf_counter(), counts["bytes"]
            for feature, acts, expl in shard_records(ids, shard, hook_name=hook_name, W_dec=W_dec):
                batch["features"].append(feature)
                batch["activations"].append(acts)
                batch["explanations"].extend(expl)
                if len(batch["features"]) == FEATURES_PER_BATCH:
                    flush()
            settle()
            if log:
                seconds, written = time.perf_counter() - shard_started, counts["bytes"] - bytes_before
                log(f"shard {number}, {_feature_range(shard.stats)}: {shard.contexts.height:,} example windows, "
                    f"{written / 1e6:.1f} MB written, {seconds:.1f} s")
        if batch["features"] or not counts["batches"]:
            flush()
        settle()
    return {**counts, "seconds": round(time.perf_counter() - started, 1), "source": source,
            "saelens_weights": saelens is not None, "path": store.resolve(neuronpedia_name(sae_name))}


def _feature_range(stats: pl.DataFrame) -> str:
    """"features 4,096-8,191" (a feature shard's, as its stats list them), "no features" for an empty one."""
    if not stats.height:
        return "no features"
    return f"features {stats[FEATURE].min():,}-{stats[FEATURE].max():,}"


def read_export(store, sae_name: str) -> dict[str, list[dict]]:
    """Every record of the committed export of ``sae_name``, by kind (release, model, sourceset,
    source, features, activations, explanations); StorageError when there is none."""
    path = store.require(neuronpedia_name(sae_name), f"Neuronpedia export of {sae_name!r}",
                         "materialize neuronpedia_export")
    pointer = store.pointer(neuronpedia_name(sae_name))
    base = f"{path}/{neuronpedia_source_dir(pointer['model_id'], pointer['source_id'])}"
    out = {kind: [json.loads(store.fs.cat_file(f"{base}/{kind}.jsonl"))] for kind in SINGLE_RECORDS}
    for kind in RECORD_KIND:
        out[kind] = []
        n = 0
        while store.fs.exists(f"{base}/{neuronpedia_batch_file(kind, n)}"):
            text = gzip.decompress(store.fs.cat_file(f"{base}/{neuronpedia_batch_file(kind, n)}")).decode()
            # split at "\n" only: splitlines() also splits at a U+2028 or U+0085 a token string may hold
            out[kind].extend(json.loads(line) for line in text.split("\n") if line)
            n += 1
    return out


# -- from the committed artifacts -----------------------------------------------------------------

def _input_names(sae_name: str, n_feature_shards: int) -> list[str]:
    return [name for i in range(n_feature_shards)
            for name in (tables_name(sae_name, i), logits_name(sae_name, i), contexts_name(sae_name, i),
                         explanations_name(sae_name, i), llm_explanations_name(sae_name, i))]


def input_versions(store, sae_name: str, n_feature_shards: int) -> dict[str, str | None]:
    """The committed version of every artifact an export of ``sae_name`` reads (None: not built),
    and of its SAELens export: an export that recorded these describes what is stored now."""
    names = [*_input_names(sae_name, n_feature_shards), export_name(sae_name)]
    return {name: (store.pointer(name) or {}).get("version") for name in names}


def export_current(store, sae_name: str, n_feature_shards: int) -> bool:
    """Whether the committed export pins the current checkpoint and was written from the artifacts
    stored now (a rebuilt table, window or explanation makes it stale)."""
    pointer = store.pointer(neuronpedia_name(sae_name))
    return (is_current(store, sae_name, pointer)
            and pointer.get("inputs") == input_versions(store, sae_name, n_feature_shards))


def saelens_files(store, sae_name: str) -> dict[str, bytes] | None:
    """The SAELens export of the current checkpoint ({file name: bytes}), or None when the SAE has
    none (a Switch SAE, a TopK transcoder: no SAELens equivalent) or it describes another checkpoint."""
    pointer = store.pointer(export_name(sae_name))
    if not is_current(store, sae_name, pointer):
        return None
    path = store.resolve(export_name(sae_name))
    return {name: store.fs.cat_file(f"{path}/{name}") for name in (CFG_FILENAME, WEIGHTS_FILENAME)}


def _shard_tables(store, sae_name: str, index: int) -> ShardTables:
    tables = read_tables(store, sae_name, index)
    logits = store.require(logits_name(sae_name, index), f"logit effects of {sae_name!r}, shard {index}",
                           "materialize feature_topk")
    llm = store.resolve(llm_explanations_name(sae_name, index))
    llm_pointer = store.pointer(llm_explanations_name(sae_name, index)) or {}
    return ShardTables(stats=tables.stats, contexts=read_feature_contexts(store, sae_name, index),
                       hist_bin_edges=tables.meta["hist_bin_edges"], n_intervals=int(tables.meta["n_intervals"]),
                       logits=store.read_parquet(f"{logits}/{LOGIT_EFFECTS}"),
                       explanations=read_explanations(store, sae_name, index),
                       llm_explanations=None if llm is None else store.read_parquet(f"{llm}/{LLM_EXPLANATIONS_FILE}"),
                       llm_explainer=llm_pointer.get("explainer"))


def export_sae(store, sae_name: str, n_feature_shards: int, *, attrs: dict, entry: HookEntry,
               log: Callable[[str], None] | None = None) -> dict:
    """Export SAE ``sae_name``'s committed feature tables, windows, logit effects and explanations
    (every feature shard, one at a time in memory) with its SAELens weights: ``write_export``.
    ``attrs``/``entry``: its activations' caching attributes and hook-point entry (model, d_model,
    ctx_len; where its reconstruction belongs). StorageError naming the missing artifact and the stage
    that makes it; NeuronpediaError for a record Neuronpedia would not accept. Writes the SAELens
    export of the current checkpoint first when there is none (``export.export_run``). ``log``: as
    ``write_export``'s."""
    if not is_current(store, sae_name, store.pointer(export_name(sae_name))):
        export_run(store, sae_name)  # None (nothing written) where SAELens has no equivalent
    inputs = input_versions(store, sae_name, n_feature_shards)
    ids = export_ids(attrs.get("model", "model"), sae_name, parse_hook_point(entry.hook_name).layer)
    shards = (_shard_tables(store, sae_name, i) for i in range(n_feature_shards))
    return write_export(store, sae_name, ids, shards, hook_name=entry.hook_name, d_model=int(attrs["d_model"]),
                        ctx_len=attrs.get("ctx_len"), saelens=saelens_files(store, sae_name),
                        pin=checkpoint_pin(checkpoint_version(store, sae_name)), inputs=inputs,
                        log=log)
