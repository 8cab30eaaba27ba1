"""k-sparse probing (SAEBench's sparse probing) on tasks from the corpus: planted answers, label
sidecars (good and bad), skipped tasks, SAEBench's own output schema, and the Dagster asset."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from dagster import DagsterInstance

from sae_platform.corpus import LABELS_SIDECAR, scan_source
from sae_platform.errors import SourceError
from sae_platform.sparse_probing import (
    ContextMeans,
    label_tasks,
    saebench_output,
    source_tasks,
    sparse_probing,
    top_k_mean_diff,
)
from sae_platform.text_labels import parse_labels, read_text_labels
from tests.test_dagster_training import TRAIN, _materializations, defs  # noqa: F401  (fixture)

SAEBENCH_PYTHON = Path("/work/venvs/sae-bench/bin/python")
PLANTED = 7  # the latent that fires only on text "b"


def planted_means(n_per_text: int = 40, seed: int = 0) -> ContextMeans:
    """Three texts; latent PLANTED fires on every context of "b" and nowhere else; the other latents
    and the residual channels are noise shared by all texts."""
    rng = np.random.default_rng(seed)
    keys = np.repeat(["a", "b", "c"], n_per_text)
    latents = rng.exponential(1.0, (len(keys), 64)) * (rng.random((len(keys), 64)) < 0.3)
    latents[:, PLANTED] = np.where(keys == "b", 1.0 + rng.random(len(keys)), 0.0)
    residual = rng.normal(size=(len(keys), 16))
    return ContextMeans(keys, residual.astype(np.float32), latents.astype(np.float32))


def run(means: ContextMeans, labels=None, **settings) -> dict:
    return sparse_probing(means, labels or {}, **{"seed": 0, "min_contexts": 10, "max_contexts": 5000, **settings})


def by_task(result: dict) -> dict:
    return {t["task"]: t for t in result["tasks"]}


def test_a_latent_that_fires_only_on_one_source_is_found_at_k_1():
    result = run(planted_means())
    planted = by_task(result)["source=b"]
    assert planted["sae_top_1_columns"] == [PLANTED]
    assert planted["sae_top_1_test_accuracy"] == 1.0 and planted["n_train"] == 64 and planted["n_test"] == 16
    assert planted["llm_top_1_test_accuracy"] < 0.8  # the residual here is noise: no channel knows the source
    for other in ("source=a", "source=c"):  # classes are balanced, so chance is 0.5 and a is told from b
        assert by_task(result)[other]["sae_top_1_columns"] == [PLANTED]
    averages = result["averages"]
    assert averages["all"]["n_tasks"] == averages["source"]["n_tasks"] == 3 and "label" not in averages
    assert result["no_score"] is None and result["skipped"] == []


def test_the_split_is_seeded_and_balanced():
    first, again = run(planted_means()), run(planted_means())
    assert first == again
    other_seed = run(planted_means(), seed=1)
    assert by_task(other_seed)["source=a"]["llm_test_accuracy"] != by_task(first)["source=a"]["llm_test_accuracy"] \
        or by_task(other_seed)["source=a"]["sae_top_5_columns"] != by_task(first)["source=a"]["sae_top_5_columns"]


def test_top_k_by_class_mean_difference_is_saebenchs_rule():
    x = np.array([[0.0, 5.0, 1.0], [0.0, 5.0, 3.0], [4.0, 5.0, 0.0], [4.0, 5.0, 0.0]])
    y = np.array([True, True, False, False])
    assert top_k_mean_diff(x, y, 2).tolist() == [0, 2]  # |0-4| = 4, |2-0| = 2, |5-5| = 0


def test_tasks_with_too_few_contexts_per_class_are_skipped_with_their_counts():
    means = planted_means(n_per_text=12)
    result = run(means, min_contexts=15)
    assert result["tasks"] == [] and result["averages"] == {}
    assert "no task has min_contexts" in result["no_score"] and "3 text(s)" in result["no_score"]
    assert {s["task"]: s["reason"] for s in result["skipped"]}["source=b"] == (
        "12 contexts in the class and 24 outside it: fewer than min_contexts (15) per class")


def test_label_tasks_cover_the_texts_that_declare_the_label():
    keys = np.repeat(["a", "b", "c", "d"], 2)
    labels = {"a": {"form": "play", "verse": True, "era": "x"}, "b": {"form": "prose", "verse": False, "era": "x"},
              "c": {"form": "masque", "acts": 1}, "d": {"acts": True}}
    tasks, skipped = label_tasks(keys, labels)
    named = {t.name: t for t in tasks}
    # three values: one task each; two values: one task (the other is its complement); 1 is not true
    assert sorted(named) == ["acts=1", "form=masque", "form=play", "form=prose", "verse=false"]
    assert named["acts=1"].member.tolist() == [False] * 4 + [True] * 4
    assert named["form=play"].member.tolist() == [True] * 6 + [False] * 2  # d declares nothing
    assert named["form=play"].positive.tolist() == [True, True] + [False] * 6
    assert skipped == [{"task": "era=*", "reason": "every text declaring 'era' gives it the value x: nothing to "
                                                   "tell apart"}]
    assert [t.name for t in source_tasks(keys)] == ["source=a", "source=b", "source=c", "source=d"]


def test_declared_labels_are_probed_beside_the_sources():
    means = planted_means()
    result = run(means, {"a": {"genre": "comedy"}, "b": {"genre": "tragedy"}, "c": {"genre": "comedy"}})
    genre = by_task(result)["genre=comedy"]
    assert genre["kind"] == "label" and genre["sae_top_1_columns"] == [PLANTED]  # b is the only tragedy
    assert genre["sae_top_1_test_accuracy"] == 1.0
    assert result["averages"]["label"]["n_tasks"] == 1 and result["averages"]["all"]["n_tasks"] == 4


@pytest.mark.parametrize("content, problem", [
    (b"{genre: comedy}", "is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    (b'["comedy"]', "holds a JSON list, not an object"),
    (b'{"genre": ["comedy", "tragedy"]}', "label 'genre' has a list value"),
    (b'{"year": 1603.5}', "label 'year' has a float value"),
    (b'{"genre": null}', "label 'genre' has a null value"),
    (b'{" ": "x"}', "has an empty label name"),
    (b"\xff\xfe{}", "is not UTF-8"),
])
def test_a_bad_sidecar_names_the_file_the_problem_and_the_fix(content, problem):
    with pytest.raises(SourceError) as error:
        parse_labels(content, "hamlet.txt.labels.json")
    assert "label sidecar hamlet.txt.labels.json" in error.value.problem and problem in error.value.problem
    assert '{"genre": "tragedy", "verse": true}' in error.value.fix


def test_sidecars_are_listed_as_sidecars_and_one_bad_one_blocks_no_other(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("hamlet.txt", "notes.jsonl", "comus.txt"):
        (inbox / name).write_text("text")
    (inbox / "hamlet.txt.labels.json").write_text('{"genre": "tragedy", "verse": true}')
    (inbox / "comus.txt.labels.json").write_text('{"genre": ')
    (inbox / "orphan.txt.labels.json").write_text('{"genre": "x"}')
    listing = scan_source(str(inbox / "*"))
    assert sorted(f.key for f in listing.files) == ["comus", "hamlet", "notes"]
    assert {Path(s.url).name: s.reason for s in listing.skipped} == {
        name: LABELS_SIDECAR for name in ("comus.txt.labels.json", "hamlet.txt.labels.json", "orphan.txt.labels.json")}
    labels = read_text_labels(listing.files, [(s.url, s.reason) for s in listing.skipped])
    assert labels.labels == {"hamlet": {"genre": "tragedy", "verse": True}}
    assert set(labels.digests) == {"hamlet"}
    assert len(labels.problems) == 2
    assert "label sidecar comus.txt.labels.json is not valid JSON" in labels.problems[0]
    assert "orphan.txt.labels.json names no text of the inbox" in labels.problems[1]


@pytest.mark.skipif(not SAEBENCH_PYTHON.exists(), reason="SAEBench's environment /work/venvs/sae-bench is absent: "
                    "make it with python -m venv /work/venvs/sae-bench && /work/venvs/sae-bench/bin/pip install "
                    "sae-bench==0.6.0")
def test_the_result_file_validates_against_saebenchs_own_pydantic_model(tmp_path):
    result = run(planted_means(), {"a": {"genre": "comedy"}, "b": {"genre": "tragedy"}, "c": {"genre": "comedy"}})
    result["label_problems"] = []
    output = saebench_output(result, eval_id="topk-test-v1", evaluated_at_ms=1_760_000_000_000, model_name="tiny",
                             ctx_len=32, seed=0,
                             sae_cfg={"d_in": 16, "d_sae": 64, "hook_name": "blocks.1.hook_resid_post"})
    path = tmp_path / "saebench_sparse_probing.json"
    path.write_text(json.dumps(output))
    check = (
        "import json, sys\n"
        "from pydantic import TypeAdapter\n"
        "from sae_bench.evals.sparse_probing.eval_output import SparseProbingEvalOutput\n"
        "data = json.load(open(sys.argv[1]))\n"
        "adapter = TypeAdapter(SparseProbingEvalOutput)\n"
        "parsed = adapter.dump_python(adapter.validate_python(data), mode='json')\n"
        "def subset(mine, theirs, where):\n"  # a key the model ignores would be lost without a word
        "    if isinstance(mine, dict):\n"
        "        for key, value in mine.items():\n"
        "            assert key in theirs, f'{where}.{key} is not in SAEBench schema'\n"
        "            if where.count('.') < 2 and key != 'eval_result_unstructured':\n"
        "                subset(value, theirs[key], f'{where}.{key}')\n"
        "    elif isinstance(mine, list):\n"
        "        [subset(m, t, f'{where}[]') for m, t in zip(mine, theirs)]\n"
        "subset(data, parsed, 'output')\n"
        "print(parsed['eval_type_id'], len(parsed['eval_result_details']))\n")
    done = subprocess.run([str(SAEBENCH_PYTHON), "-c", check, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["sparse_probing", "4"]
    assert output["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"] == result["averages"]["all"][
        "sae_top_1_test_accuracy"]


def test_the_asset_probes_sources_and_labels_and_skips_when_unchanged(defs, store, text_dir):  # noqa: F811
    (text_dir / "alpha.txt.labels.json").write_text('{"register": "plain"}')
    (text_dir / "beta.txt.labels.json").write_text('{"register": "ornate"}')
    (text_dir / "gamma.txt.labels.json").write_text('{"register": ornate}')  # bad: the others still run
    run_config = {"resources": {"training": {"config": TRAIN},
                                "evaluation": {"config": {"ce_contexts": 0, "metric_contexts": 0,
                                                          "sparse_probing_min_contexts": 3}}}}

    def materialize():
        result = defs.resolve_job_def("train_saes").execute_in_process(
            instance=DagsterInstance.ephemeral(), partition_key="topk-4k-k32", run_config=run_config)
        assert result.success
        return _materializations(result)["sae_sparse_probing"]

    probing = materialize()
    tasks = {row.data["task"]: row.data for row in probing["tasks"].records}
    assert {"source=alpha", "source=beta", "source=gamma", "register=ornate"} <= set(tasks)
    assert all(0 <= t["sae_top_1_test_accuracy"] <= 1 and 0 <= t["llm_test_accuracy"] <= 1 for t in tasks.values())
    assert "gamma.txt.labels.json is not valid JSON" in probing["label_problems"]
    assert probing["hook_name"] == "blocks.1.hook_resid_post" and "| all |" in probing["averages"]
    saebench = json.loads(Path(probing["saebench_result"]).read_text())
    assert saebench["eval_type_id"] == "sparse_probing" and saebench["sae_cfg_dict"]["d_sae"] == 4096
    assert [d["dataset_name"] for d in saebench["eval_result_details"]] == list(tasks)
    pointer = store.pointer("sparse_probing/topk-4k-k32")
    again = materialize()
    assert "same checkpoint, cached contexts, label sidecars and settings" in again["up_to_date"]
    assert store.pointer("sparse_probing/topk-4k-k32")["version"] == pointer["version"]
    (text_dir / "gamma.txt.labels.json").write_text('{"register": "ornate"}')  # fixed: a new input
    fixed = materialize()
    assert "up_to_date" not in fixed and fixed["label_problems"] == "none"
