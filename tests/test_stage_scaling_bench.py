"""benchmarks/scaling.py (how each stage's cost grows with the work, issue 25) at its smallest sizes on
the tiny model: every stage runs through the core functions on a real store in its own process, and
one JSON line per figure comes out with its sizes, ratio and goal; bad sizes are refused up front."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "scaling.py"
TOKEN_STAGES = ("cache", "shuffle", "train", "pass_1", "pass_2", "pass_3", "browser")
LATENT_STAGES = ("train", "pass_1", "pass_2", "pass_3", "browser")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def _lines(stdout: str) -> dict[str, dict]:
    return {line["metric"]: line for line in map(json.loads, (x for x in stdout.splitlines() if x.startswith("{")))}


def test_every_stage_prints_its_cost_against_tokens_and_latents(tiny_model_dir, text_dir, tmp_path):
    plot, record = tmp_path / "scaling.png", tmp_path / "record.jsonl"
    run = _run("--record", str(record), "--quick", "--model", str(tiny_model_dir),
               "--model-root", str(tmp_path / "models"), "--corpus", str(text_dir),
               "--ctx-len", "16", "--tokens", "32", "--token-latents", "64",
               "--latents", "64,256", "--latent-tokens", "32", "--train-batch", "8",
               "--chunk-bytes", "512", "--shuffle-budget", "3072", "--shuffle-buckets", "8", "--plot", str(plot))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    lines = _lines(run.stdout)
    # 30 rows of 64 B a batch in chunks of 8 rows (below the pipeline's 256-row floor): a 3 KiB budget shuffles 26
    # rows in memory, so even 1x goes out of core, and the memory line measures the bounded shuffle
    shuffle = lines["scaling_shuffle_peak_rss_vs_tokens"]
    assert shuffle["n_passes"] == [2, 3, 3] and shuffle["out_of_core"], shuffle
    expected = {f"scaling_{stage}_{figure}_vs_tokens" for stage in TOKEN_STAGES
                for figure in ("seconds_per_token", "peak_rss")}
    expected |= {f"scaling_{stage}_{figure}_vs_latents" for stage in LATENT_STAGES
                 for figure in ("seconds_per_token", "peak_rss")}
    assert set(lines) == expected
    for name, line in lines.items():
        assert math.isfinite(line["ratio"]) and line["value"] > 0 and line["baseline"] > 0, name
        assert line["ratio"] == line["value"] / max(line["baseline"], 1 if "peak_rss_vs_tokens" in name else 0), name
    cache = lines["scaling_cache_seconds_per_token_vs_tokens"]
    assert len(cache["tokens"]) == 3 and cache["tokens"][2] > 8 * cache["tokens"][0]  # 1x, 4x, 16x contexts
    assert cache["goal"] == 1.25 and lines["scaling_shuffle_peak_rss_vs_tokens"]["goal"] == 1.2
    pass_1 = lines["scaling_pass_1_peak_rss_vs_latents"]
    assert pass_1["n_latents"] == [64, 256] and pass_1["goal"] == 4.0  # latents per shard grew 4x
    assert pass_1["latents_per_job"] == [16, 64]  # a pass-1 job holds one feature shard's state at a time
    for stage in ("pass_1", "pass_2", "pass_3", "browser"):  # the planned layout: the default budget, 4 shards
        line = lines[f"scaling_{stage}_peak_rss_vs_latents"]
        assert line["feature_shards"] == [4, 4] and line["memory_budget_bytes"] == 2 << 30, (stage, line)
    assert plot.read_bytes().startswith(b"\x89PNG")
    # --quick hooks layer 1 (the forward stops after block 1 of 4), and the latent sweep's 32 tokens are the token
    # sweep's 1x: cached and shuffled once, by one process holding the model for every caching size
    assert cache["stage_path"].startswith("layer 1/4")
    kept = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["label"] for r in kept if r["stage"] == "cache"] == ["1x tokens", "4x tokens", "16x tokens"]
    assert not [r for r in kept if r["sweep"] == "latent data"]
    _check_more_tokens_are_more_batches(kept, lines)
    # every stage's figures were appended as it ended: a run stopped midway keeps them, and prints them again
    again = _run("--quick", "--from-record", str(record))
    assert again.returncode == 0, again.stderr[-2000:]
    assert {k: v["values"] for k, v in _lines(again.stdout).items()} == {k: v["values"] for k, v in lines.items()}


def _check_more_tokens_are_more_batches(kept: list[dict], lines: dict[str, dict]) -> None:
    """At f times the tokens the token sweep runs f activation batches of the 1x size: one job per
    batch for caching, pass 1 and pass 3's windows (plus pass 3's regroup), one job for the others;
    a record's time is its jobs' sum and its peak the largest job's, and every job of a per-batch
    stage holds one batch whatever the factor (same rows, same planned feature layout)."""
    per_batch = {"cache": 0, "pass_1": 0, "pass_3": 1}  # jobs besides one per batch
    by_tokens = {(r["stage"], r["label"]): r for r in kept if r["sweep"] == "tokens"}
    one_batch = by_tokens[("cache", "1x tokens")]["tokens"]
    for stage in TOKEN_STAGES:
        for factor in (1, 4, 16):
            record = by_tokens[(stage, f"{factor}x tokens")]
            jobs = record["jobs"]
            assert record["n_jobs"] == len(jobs) == (factor + per_batch[stage] if stage in per_batch else 1), \
                (stage, factor)
            assert record["seconds"] == sum(j["seconds"] for j in jobs), (stage, factor)
            assert record["peak_bytes"] == max(j["peak_bytes"] for j in jobs), (stage, factor)
            assert record["peak_rss"] == max(j["peak_rss"] for j in jobs), (stage, factor)
            if stage in per_batch:
                batch_jobs = jobs[:factor]
                assert [j["tokens"] for j in batch_jobs] == [one_batch] * factor, (stage, factor)
                assert record["tokens"] == factor * one_batch
                assert len({j["label"] for j in batch_jobs}) == factor  # a batch of its own per job
    assert lines["scaling_pass_1_peak_rss_vs_tokens"]["n_jobs"] == [1, 4, 16]
    assert lines["scaling_pass_3_peak_rss_vs_tokens"]["n_jobs"] == [2, 5, 17]
    assert lines["scaling_shuffle_peak_rss_vs_tokens"]["n_jobs"] == [1, 1, 1]
    for stage in ("pass_1", "pass_2", "pass_3", "browser"):  # planned over one batch: the same at every factor
        line = lines[f"scaling_{stage}_peak_rss_vs_tokens"]
        assert len(set(line["feature_shards"])) == 1, line["feature_shards"]
        buffers = line["per_feature_buffers"]  # ~32 tokens x k 32 / 64 latents per batch: ~16 firings per latent
        firings = [factor * one_batch * 32 / 64 for factor in (1, 4, 16)]
        assert buffers["mean_firings_per_latent"] == firings, buffers
        assert buffers["filled"]["top_examples"] == [n >= 20 for n in firings] == [False, True, True], buffers


def test_a_stage_record_sums_its_jobs_times_and_keeps_the_largest_jobs_peak(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as the scripts run: their shared modules importable
    from benchmarks.scaling_stages import combine

    jobs = [{"label": f"b{i}", "tokens": 100, "seconds": 1.0 + i, "peak_bytes": 10 * (2 - i) ** 2, "peak_rss": 500 + i,
             "rss_before": 400, "hwm_reset": True, "process_seconds": 2.0, "process_cpu_seconds": 1.5,
             "path": "p", "feature_shards": 4} for i in range(3)]
    record = combine(jobs)
    assert (record["n_jobs"], record["tokens"], record["seconds"]) == (3, 300, 6.0)
    assert (record["peak_bytes"], record["peak_rss"]) == (40, 502)  # two different jobs' peaks: each the largest
    assert (record["process_seconds"], record["process_cpu_seconds"]) == (6.0, 4.5)
    assert [j["label"] for j in record["jobs"]] == ["b0", "b1", "b2"] and record["jobs"][1]["seconds"] == 2.0
    assert (record["path"], record["feature_shards"]) == ("p", 4) and "rss_before" not in record
    trained = combine([{**jobs[0], "seconds_per_token": 0.5}])
    assert trained["seconds_per_token"] == 0.5 and trained["n_jobs"] == 1


def test_the_modes_shuffle_beyond_the_budget_in_the_same_passes_at_every_size(monkeypatch):
    """--quick's and the full mode's shuffle: even the 1x rows are more than one job shuffles in memory,
    and 16x fit in the passes 1x needs, so the shuffle's memory line measures its bounded out-of-core
    memory (a budget the data fits in measures the data filling it) and its time per token the same
    passes at every size. Planned as the shuffle plans it, from the rows and chunks caching writes."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from benchmarks.scaling import FULL, QUICK, TOKEN_FACTORS
    from benchmarks.scaling_stages import SHUFFLE_JOBS, cached_chunk_rows
    from sae_platform.shuffle_plan import plan_shuffle

    row_bytes = 576 * 2  # SmolLM2-135M's d_model, cached in float16
    for sizes in (QUICK, FULL):
        rows = sizes.tokens - sizes.tokens // sizes.ctx_len  # a context's start token is no row: 508 of 512
        chunk = cached_chunk_rows(sizes.chunk_bytes, rows, row_bytes)
        passes = [plan_shuffle(factor * rows, row_bytes, sizes.shuffle_buckets, sizes.shuffle_budget, SHUFFLE_JOBS,
                               chunk).n_passes for factor in TOKEN_FACTORS]
        assert min(passes) > 1 and len(set(passes)) == 1, (sizes, passes)


def _plan(n_latents: int, d_model: int, tokens: int, budget: int | None = None):
    """The planner's layout of a TopK SAE (k 32) over ``tokens`` rows at ``budget`` (default: the settings')."""
    from sae_platform.feature_layout import plan_layout
    from sae_platform.features import FeatureSettings

    settings = FeatureSettings() if budget is None else FeatureSettings(memory_budget_bytes=budget)
    return plan_layout({"variant": "topk", "n_latents": n_latents, "d_model": d_model, "k": 32}, settings, tokens)


def _eight_shard_budget(n_latents: int, d_model: int, tokens: int) -> int:
    """A feature job budget the planner meets with 8 shards of ``n_latents`` (4 do not fit it)."""
    import dataclasses

    from sae_platform.feature_layout import plan_layout
    from sae_platform.features import FeatureSettings

    four = plan_layout({"variant": "topk", "n_latents": n_latents, "d_model": d_model, "k": 32}, FeatureSettings(),
                       tokens)
    assert four.n_shards == 4
    return dataclasses.replace(four, n_shards=8).job_bytes


def test_a_latent_sweep_of_its_own_size_caches_and_shuffles_its_data(tiny_model_dir, text_dir, tmp_path):
    """... and its feature stages follow the layout the planner makes of --memory-budget-bytes: at a
    budget for 8 shards of 128 latents, each width gets the planner's own layout over the rows cached."""
    record = tmp_path / "record.jsonl"
    budget = _eight_shard_budget(128, 32, 48)  # the tiny model's d_model: 32
    run = _run("--record", str(record), "--quick", "--sweeps", "latents", "--model", str(tiny_model_dir),
               "--model-root", str(tmp_path / "models"), "--corpus", str(text_dir), "--ctx-len", "16",
               "--latents", "64,128", "--latent-tokens", "48", "--train-batch", "8",
               "--shuffle-budget", str(1 << 20), "--memory-budget-bytes", str(budget))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    kept = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(r["stage"], r["sweep"]) for r in kept[:2]] == [("cache", "latent data"), ("shuffle", "latent data")]
    lines = _lines(run.stdout)
    assert set(lines) == {f"scaling_{stage}_{figure}_vs_latents" for stage in LATENT_STAGES
                          for figure in ("seconds_per_token", "peak_rss")}
    plans = [_plan(n_latents, 32, kept[0]["tokens"], budget) for n_latents in (64, 128)]
    assert plans[1].n_shards == 8  # the budget's own size; 64 latents hold 1/4 of the codes a job, not 1/8
    for stage in ("pass_1", "pass_2", "pass_3", "browser"):
        line = lines[f"scaling_{stage}_peak_rss_vs_latents"]
        assert (line["feature_shards"], line["memory_budget_bytes"]) == ([p.n_shards for p in plans], budget), \
            (stage, line)
    assert lines["scaling_pass_1_peak_rss_vs_latents"]["latents_per_job"] == [p.latents_per_shard for p in plans]


def test_sizes_that_cannot_run_are_refused_naming_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    run = _run("--quick", "--corpus", str(tmp_path / "empty"))
    assert run.returncode == 2 and "no .txt files in" in run.stderr and "make setup" in run.stderr
    run = _run("--quick", "--tokens", "100", "--corpus", str(tmp_path / "empty"))
    assert run.returncode == 2 and "--tokens 100 is not a multiple of --ctx-len 128" in run.stderr
    run = _run("--quick", "--memory-budget-bytes", "1000", "--corpus", str(tmp_path / "empty"))
    assert run.returncode == 2 and "--memory-budget-bytes" in run.stderr, run.stderr[-2000:]
    run = _run("--quick", "--train-batch", "4096", "--corpus", str(tmp_path / "empty"))
    assert run.returncode == 2 and "lower --train-batch or --train-steps" in run.stderr
    run = _run("--quick", "--sweeps", "token", "--corpus", str(tmp_path / "empty"))
    assert run.returncode == 2 and "no sweep token; pass tokens, latents or both" in run.stderr
    run = _run("--quick", "--from-record", str(tmp_path / "absent.jsonl"))
    assert run.returncode == 2 and "absent.jsonl: no such file" in run.stderr


def test_a_forked_job_collects_only_its_own_objects(monkeypatch):
    """The forking process's objects are frozen out of the job's garbage collector (``gc.freeze``):
    a job's collections (``Meter.start``'s) no longer walk, and copy, every page of objects it
    inherited (~0.4 s of CPU per job under a model host); the parent collects them again after."""
    import gc

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from benchmarks.scaling_stages import measure

    def collect(meter, job: dict) -> dict:
        meter.start()
        meter.stop()
        return {"frozen": gc.get_freeze_count()}

    held = [[i] for i in range(50_000)]  # the parent's own objects, each tracked by the collector
    result = measure(collect, {"label": "gc"})
    assert result["frozen"] >= len(held) and gc.get_freeze_count() == 0
    assert 0 <= result["cpu_seconds"] <= result["process_cpu_seconds"]  # the timed part's CPU, within the job's


def test_forked_stages_import_nothing_lazily(tiny_model_dir, text_dir, tmp_path):
    """After ``import_lazy_modules`` a job forked from the parent that builds training's optimizer
    (torch.optim imports torch._dynamo: ~3 s of CPU) imports nothing itself, nor does a windows job
    forked from pass 3's host that converts arrays as the windows do (pyarrow imports pandas): a
    fresh interpreter, as the benchmark runs."""
    script = f"""
import sys
sys.path[:0] = [{str(REPO / 'benchmarks')!r}, {str(REPO)!r}]
import numpy, pyarrow, torch
from benchmarks import scaling
from benchmarks.scaling_stages import load_tokenizer, measure, measure_hosted
args, _ = scaling.parse_args(["--quick", "--model", {str(tiny_model_dir)!r}, "--model-root",
                              {str(tmp_path / 'models')!r}, "--corpus", {str(text_dir)!r}])
scaling.import_lazy_modules(args)

def timed(meter, first_call):
    before = set(sys.modules)
    meter.start()
    first_call()
    meter.stop()
    return {{"imported": sorted(set(sys.modules) - before)}}

def optimizer(meter, job):
    return timed(meter, lambda: torch.optim.Adam([torch.zeros(1, requires_grad=True)]))

def windows(tokenizer, meter, job):
    return timed(meter, lambda: pyarrow.array(numpy.zeros(1)))

job = {{"label": "imports", "model_root": args.model_root, "model": args.model}}
print("training imported:", measure(optimizer, job)["imported"])
print("windows imported:", next(measure_hosted(load_tokenizer, windows, [job]))["imported"])
"""
    for _ in range(2):  # the first run converts the model in the parent (loading it imports torch._dynamo)
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    assert "training imported: []" in run.stdout and "windows imported: []" in run.stdout, run.stdout[-3000:]


def test_the_caching_host_holds_the_weights_in_its_own_memory(monkeypatch, tiny_model_dir, text_dir, tmp_path):
    """No weight of the caching host's model is a page of a file mapping: a fork shares the host's own
    pages with each job, resident, where a file mapping's pages were faulted in again by every job."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from benchmarks.scaling_stages import load_caching_model

    job = {"model_root": str(tmp_path / "models"), "model": str(tiny_model_dir), "layer": 1, "autocast": "auto",
           "corpus": str(text_dir), "ctx_len": 16, "n_contexts": 2, "text": str(tmp_path / "text.txt")}
    model = load_caching_model([job])
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((lo, hi))
    assert Path(job["text"]).stat().st_size > 0
    in_files = [name for name, p in model.model.named_parameters() if any(lo <= p.data_ptr() < hi for lo, hi in mapped)]
    assert not in_files, in_files
