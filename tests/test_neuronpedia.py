"""The Neuronpedia export: every record has exactly the fields of Neuronpedia's own record definitions
(sae_platform/neuronpedia_fields.json, transcribed from its db_models) and their invariants; the layout
is one atomic commit; where the `neuronpedia` package is installed (/work/venvs/neuronpedia, see
`make neuronpedia-venv`), its own readers accept the records. The run through Dagster on the tiny
model is in tests/test_dagster_features.py."""

import gzip
import hashlib
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from safetensors.numpy import save as save_safetensors

from sae_platform import neuronpedia as npd
from sae_platform.browser.synthetic import synthetic_shards
from sae_platform.catalog import checkpoint_pin, neuronpedia_name
from sae_platform.export import CFG_FILENAME, WEIGHTS_FILENAME
from sae_platform.tables import EXPLANATION_SCHEMA, LLM_EXPLANATION_SCHEMA

NP_PYTHON = Path(os.environ.get("SAE_PLATFORM_NEURONPEDIA_PYTHON", "/work/venvs/neuronpedia/bin/python"))
N_FEATURES, SHARD, D_MODEL = 40, 24, 8


def _explanations(start: int, stop: int) -> pl.DataFrame:
    rows = [{"feature": f, "explanation": f"word {f}" if f % 3 else "", "patterns": [[f]], "precision": 0.5,
             "recall": 0.25, "n_matches": 3, "n_firings": 6, "neighbors": [(f + 1) % N_FEATURES, -1],
             "neighbor_cosines": [0.5, float("nan")], "cooccurring": [], "cooccurring_shares": []}
            for f in range(start, stop)]
    return pl.DataFrame(rows, schema=EXPLANATION_SCHEMA)


def _llm(start: int) -> pl.DataFrame:
    return pl.DataFrame([{"feature": start, "explanation": "llm says", "balanced_accuracy": 0.75,
                          "true_positive_rate": 0.5, "true_negative_rate": 1.0, "n_positive": 2, "n_negative": 2,
                          "error": None},
                         {"feature": start + 1, "explanation": "", "balanced_accuracy": None,
                          "true_positive_rate": None,
                          "true_negative_rate": None, "n_positive": 0, "n_negative": 0, "error": "unusable answer"}],
                        schema=LLM_EXPLANATION_SCHEMA)


def small_shards() -> list[npd.ShardTables]:
    shards, edges = synthetic_shards(N_FEATURES, SHARD, n_bins=8, before=3, after=2, seed=1)
    return [npd.ShardTables(stats=s["feature_stats"], contexts=s["feature_contexts"], hist_bin_edges=edges,
                            n_intervals=5, logits=s["logit_effects"], explanations=_explanations(s["start"], s["stop"]),
                            llm_explanations=_llm(s["start"]), llm_explainer="rules at http://127.0.0.1:1")
            for s in shards]


def saelens() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    w = {"W_dec": rng.normal(size=(N_FEATURES, D_MODEL)).astype(np.float32)}
    return {CFG_FILENAME: json.dumps({"architecture": "topk", "d_sae": N_FEATURES}).encode(),
            WEIGHTS_FILENAME: save_safetensors(w)}


def export(store, shards=None, weights=True):
    ids = npd.export_ids("/models/HuggingFaceTB/SmolLM2-135M", "topk_4k k32", 1, created_at="2026-01-01T00:00:00")
    return npd.write_export(store, "sae", ids, small_shards() if shards is None else shards,
                            hook_name="blocks.1.hook_resid_post", d_model=D_MODEL, ctx_len=32,
                            saelens=saelens() if weights is True else weights, pin=checkpoint_pin("v-1"))


def test_every_record_matches_neuronpedias_definitions_and_the_tables(store):
    shards = small_shards()
    summary = export(store, shards)
    records = npd.read_export(store, "sae")
    assert summary["source"] == "smollm2-135m/1-topk-4k-k32" and summary["batches"] == 1
    source_dir = Path(summary["path"]) / summary["source"]
    assert sorted(p.name for p in source_dir.iterdir()) == [
        "activations", "explanations", "features", "model.jsonl", "release.jsonl", "saelens", "source.jsonl",
        "sourceset.jsonl"]
    assert sorted(p.name for p in (source_dir / "saelens").iterdir()) == sorted([CFG_FILENAME, WEIGHTS_FILENAME])
    spec = npd.field_definitions()["records"]
    for kind, name in (("release", "release"), ("model", "model"), ("sourceset", "sourceset"), ("source", "source"),
                       ("feature", "features"), ("activation", "activations"), ("explanation", "explanations")):
        assert records[name], name
        for record in records[name]:
            npd.check_record(kind, record)  # types, required fields, nulls, invariants
            assert set(record) <= set(spec[kind]["fields"])
    source = records["source"][0]
    assert source["id"] == "1-topk-4k-k32" and json.loads(source["saelensConfig"])["d_sae"] == N_FEATURES

    stats = pl.concat([s.stats for s in shards])
    contexts = pl.concat([s.contexts for s in shards])
    features = {int(r["index"]): r for r in records["features"]}
    assert sorted(features) == stats["feature"].to_list()
    W_dec = np.frombuffer(saelens()[WEIGHTS_FILENAME][-N_FEATURES * D_MODEL * 4:], np.float32).reshape(N_FEATURES, -1)
    for stat in stats.iter_rows(named=True):
        r = features[stat["feature"]]
        assert r["layer"] == "1-topk-4k-k32" and r["modelId"] == "smollm2-135m"
        assert r["maxActApprox"] == pytest.approx(stat["max"]) and r["frac_nonzero"] == stat["density"]
        assert r["vectorDefaultSteerStrength"] == r["maxActApprox"] and r["hasVector"] and len(r["vector"]) == D_MODEL
        assert np.array_equal(np.float32(r["vector"]), W_dec[stat["feature"]])
        assert sum(r["freq_hist_data_bar_heights"]) == sum(stat["histogram"])
        assert r["topkCosSimIndices"] == [(stat["feature"] + 1) % N_FEATURES] and r["topkCosSimValues"] == [0.5]
    # one Activation per window, the values of the window, the example at its qualifying token
    assert len(records["activations"]) == contexts.height
    by_key = {(w["feature"], w["kind"], w["interval"], w["rank"]): w for w in contexts.iter_rows(named=True)}
    max_of = dict(zip(stats["feature"], stats["max"], strict=True))
    for a in records["activations"]:
        assert len(a["values"]) == len(a["tokens"]) and a["maxValue"] == max(a["values"])
        kinds = {(f, k, i, r) for (f, k, i, r) in by_key if f == int(a["index"])}
        assert kinds
        if a["binContains"] == 1.0:  # a random example: from all activating tokens, (0, max]
            assert a["binMin"] == 0 and a["binMax"] == pytest.approx(max_of[int(a["index"])])
    intervals = [a for a in records["activations"] if a["binMin"] is not None and a["binContains"] is None]
    assert intervals and all(a["binMax"] - a["binMin"] == pytest.approx(max_of[int(a["index"])] / 5)
                             for a in intervals)
    assert len({a["id"] for a in records["activations"]}) == len(records["activations"])
    # N2G explanations where there is one, the LLM explanation that worked, not the failed one
    types = [(e["typeName"], int(e["index"])) for e in records["explanations"]]
    assert (npd.LLM_TYPE, 0) in types and (npd.LLM_TYPE, 1) not in types
    assert sum(t == npd.N2G_TYPE for t, _ in types) == sum(1 for f in range(N_FEATURES) if f % 3)


# sha256 of every file of the fixture's export (batch files decompressed: the gzip level may change; JSON
# lines in their ``canonical`` form: the encoder's spacing and float spelling may change, the records'
# values and field order may not), 16 features a batch so batch 1 spans the two shards; as the
# record-by-record export wrote them before it was vectorized (main at 573db9b; pinned at 8b1c697 from
# the raw bytes, which were their canonical form)
PINNED_EXPORT = {
    "activations/batch-0.jsonl.gz": "9ef1d47c117073fe", "activations/batch-1.jsonl.gz": "7559c024802fe437",
    "activations/batch-2.jsonl.gz": "5ad025a05da11fc7", "explanations/batch-0.jsonl.gz": "f67c701aaa8e48e1",
    "explanations/batch-1.jsonl.gz": "55660d5e49832771", "explanations/batch-2.jsonl.gz": "4b3856878de456b0",
    "features/batch-0.jsonl.gz": "9f95a4c7faf285e6", "features/batch-1.jsonl.gz": "15ee2f3626d48f4b",
    "features/batch-2.jsonl.gz": "d4527e7036aeaa25", "model.jsonl": "317b96269db5313c",
    "release.jsonl": "0fa0ad803747e70a", "saelens/cfg.json": "db66ecc2a7576bce",
    "saelens/sae_weights.safetensors": "df778669cc9b495d", "source.jsonl": "3ab0fa404d8359fd",
    "sourceset.jsonl": "4a237d2471ef9998"}


def awkward_shards() -> list[npd.ShardTables]:
    """The small shards with what the tables may hold: null, NaN and infinite activations (written as 0),
    a negative zero, null and non-ASCII token strings, a window whose every value is 0."""
    shards = small_shards()
    contexts = shards[0].contexts.with_row_index("i").with_columns(
        pl.when(pl.col("i") == 0).then(pl.lit([None, float("nan"), float("inf"), -0.0, 0.0, 1e-07]))
        .when(pl.col("i") == 1).then(pl.col("acts").list.eval(pl.element() * 0))
        .otherwise(pl.col("acts")).cast(pl.List(pl.Float32)).alias("acts"),
        pl.when(pl.col("i") == 0).then(pl.lit([None, "é", "\u2028", '"q"', "\\", "日本"]))
        .otherwise(pl.col("token_strs")).alias("token_strs")).drop("i")
    shards[0] = npd.ShardTables(**{**shards[0].__dict__, "contexts": contexts})
    return shards


def canonical(data: bytes) -> bytes:
    """JSON lines as the record-by-record export spelled them: each record parsed and written again by
    json.dumps (keys in written order, ", " and ": ", Python's float spelling), so the digests pin the
    records' values, not how an encoder spaces them or writes a float (polars: 1e-7, Python: 1e-07)."""
    lines = data.decode().split("\n")  # not splitlines: a token may hold a U+2028, written as is
    assert lines[-1] == "", "the last line ends in a newline"
    return "".join(json.dumps(json.loads(line), ensure_ascii=False) + "\n" for line in lines[:-1]).encode()


def exported_digests(store) -> dict[str, str]:
    summary = export(store, awkward_shards())
    base = Path(summary["path"]) / summary["source"]
    return {str(p.relative_to(base)): hashlib.sha256(
        canonical(gzip.decompress(p.read_bytes())) if p.suffix == ".gz"
        else canonical(p.read_bytes()) if p.suffix == ".jsonl" else p.read_bytes()).hexdigest()[:16]
        for p in sorted(base.rglob("*")) if p.is_file()}


def test_the_export_writes_exactly_the_records_it_wrote_before(store, monkeypatch):
    """Same records, same fields, same float spelling, same order, batch by batch."""
    monkeypatch.setattr(npd, "FEATURES_PER_BATCH", 16)
    assert exported_digests(store) == PINNED_EXPORT


def python_activation(ids: npd.ExportIds, w: dict, vmax: float, n_intervals: int) -> dict:
    """The Activation record of an ``export_windows`` row as the record-by-record export built it (main
    at 9201e36, before activation_lines): the reference the columnar records must equal, value for value."""
    values = w["acts"]
    top = values.index(max(values))  # Python's max and min: the first of equal values, -0.0 == 0.0
    width = float(vmax) / n_intervals
    low, high, share = ((w["interval"] * width, (w["interval"] + 1) * width, None) if w["kind"] == "interval"
                        else (0.0, float(vmax), 1.0) if w["kind"] == "random" else (None, None, None))
    return {"id": npd.record_id(ids.model_id, ids.source_id, w["feature"], w["kind"], w["interval"], w["rank"]),
            "tokens": w["token_strs"], "index": str(w["feature"]), "layer": ids.source_id, "modelId": ids.model_id,
            "maxValue": values[top], "maxValueTokenIndex": top, "minValue": min(values), "values": values,
            "creatorId": npd.CREATOR_ID, "dataSource": w["partition"], "dataIndex": str(w["row"]),
            "createdAt": ids.created_at, "binMin": low, "binMax": high, "binContains": share,
            "qualifyingTokenIndex": int(w["center"])}


def test_activation_records_take_the_first_maximum_and_minimum_as_python_does():
    """maxValue / maxValueTokenIndex: the first maximum (``values.index(max(values))``), minValue: the first
    minimum (``min``), zeros of either sign being equal, as Python compares them (polars' own list.max
    / list.min may answer 0.0 for a window whose first zero is -0.0); and every other field as the
    record-by-record export wrote it, the floats of binMin / binMax included."""
    shard = small_shards()[0]
    rng = np.random.default_rng(3)
    pool = np.array([-0.0, 0.0, 0.0, -0.0, 1.5, 1.5, -1.5, -1.5, 0.25, 1e-07])
    n = shard.contexts.height
    acts = rng.choice(pool, size=(n, 6))
    acts[:6] = [[-0.0, 0.0, 0.0, -0.0, 0.0, -0.0], [0.0, -0.0, -0.0, 0.0, -0.0, 0.0], [-0.0] * 6,
                [-1.5, -0.0, 0.0, -1.5, 0.0, -0.0], [1.5, 0.25, 1.5, -0.0, 0.0, -0.0],
                [-0.0, -1.5, 0.0, -1.5, 0.0, 1e-07]]
    contexts = shard.contexts.with_columns(pl.Series("acts", acts, pl.Array(pl.Float64, 6)).arr.to_list()
                                           .cast(pl.List(pl.Float32)))
    ids = npd.export_ids("/models/m", "sae", 1, created_at="2026-01-01T00:00:00")
    windows = npd.check_windows(npd.export_windows(contexts))
    lines = npd.activation_lines(ids, windows, shard.stats, shard.n_intervals)
    written = [json.loads(line) for f in sorted(lines) for line in lines[f].lines.decode().split("\n")[:-1]]
    vmax = dict(shard.stats.select("feature", "max").iter_rows())
    expected = [python_activation(ids, w, vmax[w["feature"]], shard.n_intervals) for w in windows.iter_rows(named=True)
                if w["feature"] in vmax]
    assert len(written) == len(expected) == n
    # json.dumps tells -0.0 from 0.0 and lists the fields in order
    assert [json.dumps(r) for r in written] == [json.dumps(r) for r in expected]
    tied = [r for r in written if r["maxValue"] == 0.0]
    assert {math.copysign(1, r["maxValue"]) for r in tied} == {1.0, -1.0}
    assert {math.copysign(1, r["minValue"]) for r in written if r["minValue"] == 0.0} == {1.0, -1.0}
    first = windows.group_by("feature", maintain_order=True).first().select("feature", "kind", "rank")
    assert {f: lines[f].first for f in lines} == {f: (k, r) for f, k, r in first.rows()}


def test_feature_and_explanation_lines_hold_the_values_pythons_json_wrote(store):
    """Feature and Explanation batches are encoded by polars with the declared types: the same values
    as json.dumps wrote (a float stays a float, -0.0 keeps its sign, strings as they are), field order kept."""
    export(store)
    records = npd.read_export(store, "sae")
    awkward = {"vector": [-0.0, 0.0, 1e-07, 5e-324, 1e16, 1.7976931348623157e308, -2.5e-10, 100.0],
               "pos_str": ["\u2028", '"q"', "\\", "日本", "\x00\n"], "vectorLabel": "é"}
    features = [{**records["features"][0], **awkward}, *records["features"][1:]]
    for kind, written in (("feature", features), ("explanation", records["explanations"])):
        lines = npd._jsonl(kind, written).decode().split("\n")
        assert lines[-1] == ""
        assert [json.dumps(json.loads(line)) for line in lines[:-1]] == [json.dumps(r) for r in written]
    with pytest.raises(ValueError, match="feature records with different fields"):
        npd._jsonl("feature", [features[0], {k: v for k, v in features[1].items() if k != "vectorLabel"}])


def test_the_export_is_the_same_bytes_at_every_run(tmp_path, monkeypatch):
    """Every file, the gzipped batches too, is byte for byte the same at every export of the same tables:
    the windows grouped per feature keep their order, gzip writes no time."""
    from sae_platform.storage import ArtifactStore

    monkeypatch.setattr(npd, "FEATURES_PER_BATCH", 16)
    runs = []
    for run in range(3):
        summary = export(ArtifactStore(str(tmp_path / f"run-{run}")), awkward_shards())
        base = Path(summary["path"]) / summary["source"]
        runs.append({str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()})
    assert sorted(runs[0]) == sorted(PINNED_EXPORT) and runs[0] == runs[1] == runs[2]


def test_a_batch_that_fails_to_be_written_fails_the_export_and_commits_nothing(store, monkeypatch):
    """Batches are gzipped and written on a thread while the next one is built: what that raises is
    raised by write_export, and nothing is committed."""
    monkeypatch.setattr(npd, "FEATURES_PER_BATCH", 16)
    write = store.write_bytes_atomic

    def failing(path, data):
        if path.endswith("activations/batch-1.jsonl.gz"):
            raise OSError("disk full")
        write(path, data)

    monkeypatch.setattr(store, "write_bytes_atomic", failing)
    with pytest.raises(OSError, match="disk full"):
        export(store)
    assert store.resolve(neuronpedia_name("sae")) is None


def test_read_export_keeps_tokens_with_line_separators(store):
    """A token string may hold U+2028 (written as is, valid JSON): the export is read a line per newline."""
    export(store, awkward_shards())
    tokens = [t for a in npd.read_export(store, "sae")["activations"] for t in a["tokens"]]
    assert "\u2028" in tokens and "日本" in tokens and '"q"' in tokens


def test_the_export_reports_each_shard_and_its_bytes_and_seconds(store):
    """A long export shows life: one line per feature shard as it is done (its features, windows,
    bytes and seconds), and its summary says how many bytes it wrote and how long it took."""
    lines = []
    ids = npd.export_ids("/models/m", "sae", 1, created_at="2026-01-01T00:00:00")
    summary = npd.write_export(store, "sae", ids, small_shards(), hook_name="blocks.1.hook_resid_post",
                               d_model=D_MODEL, ctx_len=32, saelens=saelens(), pin=checkpoint_pin("v-1"),
                               log=lines.append)
    assert [line.split(":")[0] for line in lines] == ["shard 0, features 0-23", "shard 1, features 24-39"]
    windows = [s.contexts.height for s in small_shards()]
    assert all(f": {n:,} example windows, " in line and line.endswith(" s") for line, n in zip(lines, windows))
    files = [p for p in (Path(summary["path"]) / summary["source"]).rglob("*") if p.is_file()]
    assert summary["bytes"] == sum(p.stat().st_size for p in files) > 0
    assert 0 <= summary["seconds"] < 60


def test_a_record_neuronpedia_would_refuse_commits_nothing(store):
    shards = small_shards()
    bad = shards[1].contexts.with_columns(pl.col("acts").list.head(1))  # a window with fewer values than tokens
    shards[1] = npd.ShardTables(**{**shards[1].__dict__, "contexts": bad})
    with pytest.raises(npd.NeuronpediaError, match=r"activation record of feature \d+ .*1 values for 6 tokens"):
        export(store, shards)
    assert store.resolve(neuronpedia_name("sae")) is None


@pytest.mark.parametrize("column, value, message", [
    ("center", pl.lit(99, pl.Int32), "qualifyingTokenIndex 99 is outside the 6 tokens"),
    ("partition", pl.lit(None, pl.String), "dataSource or dataIndex is null"),
    ("acts", pl.lit([], pl.List(pl.Float32)), "0 values for 6 tokens"),
])
def test_every_window_is_checked_not_only_each_features_first(store, column, value, message):
    """Windows are checked on the whole frame (check_windows): a bad last window of a feature stops the export."""
    shards = small_shards()
    contexts = shards[1].contexts.sort("feature", "kind", "interval", "rank", nulls_last=True)
    last = pl.int_range(pl.len()) == contexts.height - 1
    bad = contexts.with_columns(pl.when(last).then(value).otherwise(pl.col(column)).alias(column))
    shards[1] = npd.ShardTables(**{**shards[1].__dict__, "contexts": bad})
    with pytest.raises(npd.NeuronpediaError, match=rf"activation record of feature 39 .*{message}"):
        export(store, shards)
    assert store.resolve(neuronpedia_name("sae")) is None


@pytest.mark.parametrize("field, value, message", [
    ("maxValue", float("nan"), "maxValue = nan is not float"),
    ("binContains", 1.5, "binContains 1.5 is not a fraction"),
    ("surprise", 1, r"unknown fields \['surprise'\]"),
    ("maxValueTokenIndex", True, "maxValueTokenIndex = True is not int"),
])
def test_check_record_names_the_field_and_the_rule(field, value, message):
    record = {"id": "c1", "tokens": ["a", "b"], "index": "3", "layer": "1-x", "modelId": "m", "maxValue": 2.0,
              "maxValueTokenIndex": 1, "minValue": 0.0, "values": [0.0, 2.0], "creatorId": "c"}
    npd.check_record("activation", record)
    with pytest.raises(npd.NeuronpediaError, match=message):
        npd.check_record("activation", {**record, field: value})


def test_without_saelens_weights_features_carry_no_vector(store):
    export(store, weights=None)
    features = npd.read_export(store, "sae")["features"]
    assert not any(f["hasVector"] or f["vector"] for f in features)
    assert all(math.isfinite(f["maxActApprox"]) for f in features)


@pytest.mark.skipif(not NP_PYTHON.exists(), reason=f"the neuronpedia package is not installed at {NP_PYTHON} "
                    "(make neuronpedia-venv builds it; the checked-in field definitions are tested above)")
def test_the_neuronpedia_package_reads_the_records(store, tmp_path):
    """neuronpedia==1.2.1's own readers of database records (Activation.from_np_db_json checks the
    token/value lengths and that binContains is a fraction; Explanation.from_np_db_json) accept every
    activation and explanation; its API records name the source ``source`` where the export says ``layer``."""
    export(store)
    records = npd.read_export(store, "sae")
    (tmp_path / "records.json").write_text(json.dumps({k: records[k] for k in ("activations", "explanations")}))
    script = (
        "import json, sys\n"
        "from neuronpedia.np_activation import Activation\n"
        "from neuronpedia.np_explanation import Explanation\n"
        "r = json.load(open(sys.argv[1]))\n"
        "acts = [Activation.from_np_db_json({**a, 'source': a['layer']}) for a in r['activations']]\n"
        "expl = [Explanation.from_np_db_json({**e, 'source': e['layer']}) for e in r['explanations']]\n"
        "print(len(acts), len(expl), acts[0].source)\n")
    done = subprocess.run([str(NP_PYTHON), "-c", script, str(tmp_path / "records.json")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(records["activations"])), str(len(records["explanations"])),
                                   "1-topk-4k-k32"]
