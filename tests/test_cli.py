"""The operator CLI answers at once: `--help` and `status` import neither Dagster nor torch."""

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules_after(code: str, env: dict | None = None) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         cwd=REPO, capture_output=True, text=True, check=True, env=env)
    return set(out.stdout.split())


def test_help_loads_no_heavy_module():
    loaded = _modules_after("import jobs.cli\ntry:\n    jobs.cli.main(['--help'])\nexcept SystemExit:\n    pass")
    assert not {"torch", "dagster", "transformers", "polars"} & loaded


def test_serving_commands_help_shows_their_defaults(capsys):
    """`serve --help`, `browse --help`, `lineage --help` and the browser module's `serve --help`
    say what each option is when not given; the defaults come from sae_platform.browser.address."""
    import pytest

    from jobs.cli import main
    from sae_platform.browser.__main__ import main as browser_main

    for command, expected in ((main, ["serve", "--help"]), (main, ["browse", "--help"]),
                              (browser_main, ["serve", "--help"])):
        with pytest.raises(SystemExit):
            command(expected)
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: 127.0.0.1)" in text and "(default: 8000)" in text, text
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: auto)" in text and "(default: 256)" in text
    assert "(default: None)" not in text                     # --sae: its help says where its default comes from
    with pytest.raises(SystemExit):
        main(["lineage", "--help"])
    assert "(default: 0)" in capsys.readouterr().out


def _subcommand_parsers(parser, path=()):
    """(command words, parser) of every subcommand of ``parser``, nested ones (``vector add``) included."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subcommand_parsers(sub, (*path, name))


def test_every_subcommands_help_shows_each_options_default(capsys):
    """Not only `serve`: every option of every subcommand that has a default says it in `--help`
    (or says where its default comes from), so `steer --help` reads like `serve --help`."""
    import argparse

    import pytest

    from jobs.cli import main

    parser = None

    def capture(self, *args, **kwargs):
        nonlocal parser
        parser = self
        raise SystemExit(0)

    with pytest.MonkeyPatch.context() as patch:  # the top-level parser main builds, as main builds it
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(SystemExit):
            main([])
    commands = list(_subcommand_parsers(parser))
    assert {"steer", "serve", "lineage", "timings"} <= {words[0] for words, _ in commands}
    assert ("vector", "add") in {words for words, _ in commands}
    missing = []
    for words, sub in commands:
        with pytest.raises(SystemExit):
            main([*words, "--help"])
        text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
        for action in sub._actions:
            if not action.option_strings or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
                continue
            if f"(default:{action.default})".replace(" ", "") not in text and "default:" not in (action.help or ""):
                missing.append(f"{' '.join(words)} {action.option_strings[-1]}")
    assert not missing, f"options whose --help hides their default: {missing}"


def test_status_reads_the_store_without_dagster_or_torch(tmp_path):
    env = {**os.environ, "SAE_PLATFORM_ROOT": str(tmp_path / "artifacts")}
    loaded = _modules_after("import jobs.cli\njobs.cli.main(['status'])", env)
    assert not {"torch", "dagster", "transformers"} & loaded


def test_cli_flags_default_to_the_deployment_settings():
    from jobs.cli import stage_settings

    assert stage_settings(training={"token_budget": None, "lr": None}) == {"resources": {}}
    assert stage_settings(training={"token_budget": 2048, "lr": None}, evaluation={"ce_contexts": None}) == {
        "resources": {"training": {"config": {"token_budget": 2048}}}}


def test_status_names_every_inbox_file_waiting_to_be_cached(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "alpha.txt").write_text("Some text to cache. " * 20)
    (inbox / "a b.txt").write_text("Other text. " * 20)
    (inbox / "empty.txt").write_bytes(b"")
    env = {**os.environ, "SAE_PLATFORM_ROOT": str(tmp_path / "artifacts"), "SAE_PLATFORM_INBOX": str(inbox / "*")}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "status"], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "2 readable file(s), 2 waiting to be cached" in out
    assert "to cache alpha.txt as partition alpha" in out and "to cache a b.txt as partition a_b~" in out
    assert "skipped empty.txt: empty (0 bytes)" in out


def test_timings_sums_step_time_per_op_from_the_event_log(tmp_path, monkeypatch, capsys):
    """`sae-platform timings` reads a real run's event log: a mapped op's steps count for the op."""
    import time

    from dagster import DagsterInstance, DynamicOut, DynamicOutput, job, op

    from jobs.cli import main, step_times

    @op(out=DynamicOut())
    def fan():
        for i in range(3):
            yield DynamicOutput(i, mapping_key=f"k{i}")

    @op
    def slow(i):
        time.sleep(0.2)
        return i

    @op
    def total(values):
        return sum(values)

    @job
    def tiny():
        total(fan().map(slow).collect())

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        run_id = tiny.execute_in_process(instance=instance).run_id
        rows, wall = step_times(instance, run_id)
    ops = {op_name: (n, seconds) for op_name, n, seconds in rows}
    assert set(ops) == {"fan", "slow", "total"} and ops["slow"][0] == 3
    assert rows[0][0] == "slow" and ops["slow"][1] >= 0.6 and wall >= ops["slow"][1]
    assert main(["timings"]) == 0  # the latest run by default
    out = capsys.readouterr().out
    assert f"run {run_id}: 5 steps" in out and "slow" in out
    assert main(["timings", run_id[:8]]) == 0  # a unique prefix, as the UI shows run ids
    assert f"run {run_id}: 5 steps" in capsys.readouterr().out
    assert main(["timings", "no-such-run"]) == 2
    assert "no run(s) no-such-run" in capsys.readouterr().err


def test_features_launches_the_asset_job_of_every_feature_stage(tmp_path):
    """`sae-platform features` runs the jobs the UI runs, one per stage of the features group, in
    dependency order, each on every partition it covers: a stage it skipped fails here."""
    from dagster import AssetKey

    from assets import STAGES
    from assets.partitions import ACTIVATION_BATCHES, FEATURE_PASS_1_JOBS, FEATURE_SHARDS
    from jobs.cli import feature_runs
    from jobs.definitions import ASSET_JOBS, build_definitions
    from jobs.settings import Settings

    runs = feature_runs(["alpha", "beta"])
    graph = build_definitions(Settings(root_url=str(tmp_path / "artifacts"), data_dir=str(tmp_path),
                                       inbox=str(tmp_path / "inbox" / "*"), s3_endpoint_url=None)).resolve_asset_graph()
    selected = {job.name: [key.to_user_string() for key in job.selection.resolve(graph)] for job in ASSET_JOBS}
    covered = [asset for job_name, _ in runs for asset in selected[job_name]]
    features = [stage.asset for stage in STAGES.values() if stage.group == "features"]
    assert sorted(covered) == sorted(features)
    assert "feature_llm_explanations" in covered  # (skipped while resources.llm_explainer is off)
    built = set()
    for job_name, keys in runs:
        for asset in selected[job_name]:
            reads = {key.to_user_string() for key in graph.get(AssetKey(asset)).parent_keys}
            assert reads & set(features) <= built, f"{asset} would run before what it reads"
            partitions = STAGES[asset].partitions
            groups = FEATURE_SHARDS.get_partition_keys()
            assert keys == ([None] if partitions is None else ["alpha", "beta"] if partitions is ACTIVATION_BATCHES
                            else [f"{b}|{g}" for b in ("alpha", "beta") for g in groups]
                            if partitions is FEATURE_PASS_1_JOBS else groups), job_name
            assert partitions in (None, ACTIVATION_BATCHES, FEATURE_SHARDS, FEATURE_PASS_1_JOBS)
        built |= set(selected[job_name])


def test_a_failed_run_is_reported_with_the_error_its_stage_raised():
    from dagster import AssetCheckResult, AssetCheckSpec, Definitions, MaterializeResult, asset, define_asset_job

    from jobs.cli import run_failure
    from sae_platform.errors import PlatformError

    @asset
    def broken():
        raise PlatformError("the tables describe another checkpoint", "rebuild them")

    @asset(check_specs=[AssetCheckSpec("exact", asset="checked", blocking=True)])
    def checked():
        return MaterializeResult(check_results=[AssetCheckResult(check_name="exact", passed=False)])

    defs = Definitions(assets=[broken, checked], jobs=[define_asset_job("b", selection=["broken"]),
                                                       define_asset_job("c", selection=["checked"])])
    failure = run_failure(defs.resolve_job_def("b").execute_in_process(raise_on_error=False))
    assert failure.startswith("broken: ") and "another checkpoint" in failure and "How to fix: rebuild them" in failure
    assert run_failure(defs.resolve_job_def("c").execute_in_process(raise_on_error=False)) == (
        "checked: check exact failed")


def test_verify_reports_a_flipped_byte_an_edited_cfg_and_a_swapped_base_model(tmp_path, tiny_model_dir):
    """`sae-platform verify` re-hashes every committed artifact against what its writer recorded."""
    import json

    import numpy as np

    from sae_platform import catalog
    from sae_platform.model import store_base_model
    from sae_platform.storage import ArtifactStore

    store = ArtifactStore(str(tmp_path / "artifacts"))
    store_base_model(store, str(tiny_model_dir))
    with store.writing(catalog.partition_name("b0")) as version:
        group = store.open_group(f"{version}/{catalog.FIRST_STORE}", "w")
        group.create_array("acts", data=np.ones((2048, 8), np.float16), chunks=(512, 8), compressors=None)
    with store.writing(catalog.checkpoint_name("run")) as version:
        store.fs.pipe_file(f"{version}/cfg.json", json.dumps({"sae": {"k": 4}}).encode())
        store.fs.pipe_file(f"{version}/sae_weights.safetensors", b"\0" * 64)

    def verify(*names):
        env = {**os.environ, "SAE_PLATFORM_ROOT": str(tmp_path / "artifacts")}
        return subprocess.run([sys.executable, "-m", "jobs.cli", "verify", *names], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    clean = verify()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "3 artifact(s) intact, 0 damaged" in clean.stdout

    chunk = f"{store.resolve(catalog.partition_name('b0'))}/{catalog.FIRST_STORE}/acts/c/2/0"
    data = bytearray(store.fs.cat_file(chunk))
    data[100] ^= 0x01                                                   # one flipped bit
    store.fs.pipe_file(chunk, bytes(data))
    cfg = f"{store.resolve(catalog.checkpoint_name('run'))}/cfg.json"
    store.fs.pipe_file(cfg, json.dumps({"sae": {"k": 8}}).encode())     # edited, same size
    model = f"{store.resolve(catalog.model_name(str(tiny_model_dir)))}/model.safetensors"
    weights = bytearray(store.fs.cat_file(model))
    weights[-8:] = b"\x01" * 8                                          # another model's last weights
    store.fs.pipe_file(model, bytes(weights))

    damaged = verify()
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    out = damaged.stdout
    assert "0 artifact(s) intact, 3 damaged" in out
    assert "DAMAGED activations/b0" in out and "data.zarr/acts/c/2/0 has changed" in out
    assert "DAMAGED sae/run" in out and "cfg.json has changed" in out
    assert f"DAMAGED {catalog.model_name(str(tiny_model_dir))}" in out and "model.safetensors has changed" in out
    assert "sae-platform backfill b0" in out and "sae-platform train run" in out

    one = verify("sae")                                                 # a prefix: the artifacts under it
    assert one.returncode == 1 and "0 artifact(s) intact, 1 damaged" in one.stdout
    unknown = verify("activations/nope")
    assert unknown.returncode == 2 and "nothing is committed at 'activations/nope'" in unknown.stderr


@functools.cache
def _definitions_parents() -> dict[str, tuple[str, ...]]:
    """Every asset of the code location's definitions → the assets it reads, from Dagster's own
    resolved asset graph (the fact ``jobs.asset_graph.ASSET_PARENTS`` copies)."""
    from jobs.definitions import build_definitions

    graph = build_definitions().resolve_asset_graph()
    return {key.to_user_string(): tuple(sorted(p.to_user_string() for p in graph.get(key).parent_keys))
            for key in graph.get_all_asset_keys()}


def test_the_static_asset_graph_is_the_definitions_graph():
    """`lineage` prints the edges of a static table so that it imports no asset module; this binds
    the table to the stage declarations: a changed dep fails here until the table is updated."""
    from jobs.asset_graph import ASSET_PARENTS

    expected = _definitions_parents()
    table = "".join(f"    {k!r}: {v!r},\n".replace("'", '"') for k, v in sorted(expected.items()))
    assert {k: tuple(sorted(v)) for k, v in ASSET_PARENTS.items()} == expected, \
        f"the asset graph changed: set ASSET_PARENTS in jobs/asset_graph.py to\n{table}"


def test_lineage_prints_the_asset_graphs_real_edges():
    """Each asset upstream of feature_topk on its own line with every asset it reads (a DAG: the
    activations feed both the shuffle and feature pass 1), not a BFS order drawn as one chain."""
    from jobs.asset_graph import ASSET_PARENTS
    from sae_platform.lineage import format_asset_edges, latent_range

    lines = [" ".join(line.split()) for line in format_asset_edges(ASSET_PARENTS, "feature_topk").splitlines()]
    assert lines[0] == "feature_topk ← feature_stats_partial"
    assert "feature_stats_partial ← activations, feature_codes, sae_checkpoint" in lines
    assert "feature_codes ← activations, sae_checkpoint" in lines
    assert "shuffle_plan ← activations" in lines and "activations ← base_model" in lines
    assert "base_model (no upstream)" in lines and len(lines) == len(set(lines)) == 11
    assert latent_range([0, 4096]) == "latents [0, 4096)"          # the browser's half-open notation


def _root_with_recorded_lineage(root: Path, sae: str, shard: int) -> dict:
    """An artifact root holding shard ``shard``'s tables of ``sae`` and the lineage record its
    feature_topk run wrote (the shape of ``feature_table_lineage``), the shuffled store since
    re-shuffled to another plan."""
    from sae_platform import catalog
    from sae_platform.storage import ArtifactStore

    store = ArtifactStore(str(root))
    with store.writing(catalog.tables_name(sae, shard), start=4096, stop=8192) as version:
        store.fs.pipe_file(f"{version}/meta.json", b"{}")
    with store.writing(catalog.shuffled_name("main")) as version:
        store.write_json(f"{version}/{catalog.SHUFFLED_INDEX}", {"plan_id": "plan-new", "inputs": []})
    lineage = {
        "checkpoint": "v-ckpt",
        "feature_table": {"sae": sae, "shard": shard, "version": "v-tables", "features": [4096, 8192],
                          "dagster_run_id": "run-that-built-the-tables"},
        "sae_checkpoint": {"name": sae, "version": "v-ckpt", "step": 600, "tokens": 614400, "variant": "topk"},
        "shuffle": {"name": "main", "plan_id": "plan-old", "current_plan_id": "plan-old", "n_rows": 121700},
        "activation_partitions": [{"key": "alpha", "version": "v-a", "n_rows": 20286},
                                  {"key": "gamma", "version": "v-g", "n_rows": 101414}],
        "base_model": {"model": "smollm2-135m", "hook_name": "blocks.15.hook_resid_post", "d_model": 576},
    }
    store.write_json(catalog.lineage_record_path(store, sae, shard), lineage)
    return lineage


def _imported_top_level(importtime_log: str) -> set[str]:
    """The top-level packages a ``python -X importtime`` run imported (its stderr)."""
    names = (line.split("|")[-1].strip() for line in importtime_log.splitlines() if line.startswith("import time:"))
    return {name.split(".")[0] for name in names}


def test_lineage_reads_the_store_without_dagster_or_torch(tmp_path):
    """`sae-platform lineage` answers from the store alone: the run that built the tables from their
    lineage record, the asset graph's edges (the definitions' own) from jobs.asset_graph; no
    Dagster, no torch, so it answers in well under 2 s."""
    from sae_platform.lineage import format_asset_edges

    sae = "topk-4k-k32"
    _root_with_recorded_lineage(tmp_path / "artifacts", sae, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_PLATFORM_") and k != "DAGSTER_HOME"}
    env.update(SAE_PLATFORM_ROOT=str(tmp_path / "artifacts"), PYTHONPATH=str(REPO))
    command = [sys.executable, "-X", "importtime", "-m", "jobs.cli", "lineage", "--sae", sae, "--shard", "1"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert not {"torch", "dagster", "transformers", "assets", "resources"} & _imported_top_level(done.stderr)
    out = done.stdout
    assert f"feature tables {sae} shard f1 latents [4096, 8192)  version v-tables" in out
    assert "dagster run run-that-built-the-tables" in out and "(the store has since been re-shuffled: plan-new)" in out
    assert "activations/alpha" in out and "activations/gamma" in out and "blocks.15.hook_resid_post" in out
    edges = out.split("(each asset ← the assets it reads):\n", 1)[1]
    assert edges.rstrip("\n") == format_asset_edges(_definitions_parents(), "feature_topk")
    assert seconds < 5, f"lineage took {seconds:.1f} s"   # < 2 s unloaded; loose for a loaded CI machine
