"""The multi-pass shuffle as assets: plan → scatter pass 1 → scatter pass 2 → final pass → shuffled store.

Each pass is partitioned by *worker*: worker w runs the pass's jobs j with j % N_WORKERS == w. A
backfill launches one run per worker, so the workers of a pass run side by side (run launcher or
Kubernetes/Celery); a single ranged run (partitions 0...N-1, what `sae-platform shuffle` does)
runs the whole shuffle in one process. How many jobs a pass has comes from the plan (pass 1: N
jobs; pass p: K^(p-1) jobs; final: one per bucket), so the same assets serve any data size up to
K²·M; a pass the plan does not need does nothing. Every stage is up to date (skipped) once the
committed store holds the current plan; all of them are versioned by the plan id.

With several hook points cached per pass (``caching.config.hook_points``) every stage works on
one shuffled store per hook-point entry (``catalog.hook_store_name``: ``main``, ``main.h1``, …),
each planned and checked on its own; versions join their plan ids.
"""

from dagster import AssetCheckSeverity, MetadataValue

from assets.partitions import N_SHUFFLE_WORKERS, SHUFFLE_WORKERS
from assets.stage import AssetJob, Check, Stage, StageRun
from sae_platform import catalog
from sae_platform import shuffle as sh
from sae_platform.activations import activation_attrs
from sae_platform.catalog import cached_hook_points
from sae_platform.errors import StorageError
from sae_platform.inbox import failed_attempts
from sae_platform.shuffle_checks import permutation_check, uniformity_stats
from sae_platform.shuffled import open_shuffled

MAX_SCATTER_PASSES = 2  # assets below: plans of up to 3 passes, i.e. K²·M of data
RESOURCES = ("storage", "shuffle")


def _settings(run: StageRun) -> sh.ShuffleSettings:
    return run.resources.shuffle.settings()


def _names(run: StageRun) -> list[str]:
    """One shuffled store per cached hook-point entry."""
    return catalog.hook_shuffle_names(run.store, _settings(run).name)


def _describe(run: StageRun, store_index: int, name: str) -> dict:
    settings = _settings(run)
    return sh.describe_plan(run.store, name, n_buckets=settings.n_buckets,
                            memory_budget_bytes=settings.memory_budget_bytes, n_jobs=N_SHUFFLE_WORKERS,
                            seed=settings.seed, store_index=store_index)


def plan_committed(run: StageRun) -> str | None:
    """Up to date when every committed store already holds the plan the current inputs give."""
    held = []
    for store_index, name in enumerate(_names(run)):
        plan_id = _describe(run, store_index, name)["plan_id"]
        if sh.committed_plan_id(run.store, name) != plan_id or sh.planned_id(run.store, name) != plan_id:
            return None
        held.append(f"{catalog.shuffled_name(name)} already holds plan {plan_id}")
    return "; ".join(held) + " (the cached batches and settings are unchanged)"


def store_holds_plan(run: StageRun) -> str | None:
    """A pass (or the commit) is up to date when every committed store holds its current plan."""
    held = []
    for name in _names(run):
        plan_id = sh.planned_id(run.store, name)
        if plan_id is None or sh.committed_plan_id(run.store, name) != plan_id:
            return None
        held.append(f"{catalog.shuffled_name(name)} already holds plan {plan_id}")
    return "; ".join(held)


def _joined(ids: list[str | None]) -> str | None:
    return None if any(i is None for i in ids) else "+".join(ids)


def planned(run: StageRun) -> str | None:
    return _joined([sh.planned_id(run.store, name) for name in _names(run)])


def committed(run: StageRun) -> str | None:
    return _joined([sh.committed_plan_id(run.store, name) for name in _names(run)])


def plan_shuffle(run: StageRun) -> dict:
    """Pin every committed activation partition and plan the passes from size, K and the budget
    (for each hook-point entry's store)."""
    settings = _settings(run)
    names = _names(run)
    runs = [sh.start_shuffle(run.store, name, n_buckets=settings.n_buckets,
                             memory_budget_bytes=settings.memory_budget_bytes, n_jobs=N_SHUFFLE_WORKERS,
                             seed=settings.seed, store_index=store_index) for store_index, name in enumerate(names)]
    shuffle_run = runs[0]
    plan = max((r.plan for r in runs), key=lambda p: p.n_passes)
    if plan.n_passes - 1 > MAX_SCATTER_PASSES:
        raise StorageError(f"the data needs {plan.n_passes} passes; the pipeline defines {MAX_SCATTER_PASSES} "
                           "scatter passes plus the final one",
                           "raise resources.shuffle.config.memory_budget_bytes or n_buckets")
    for warning in plan.warnings:
        run.log.warning(warning)
    failed = {key: record["reason"] for key, record in failed_attempts(run.store).items()}
    if failed:  # recorded by the caching stage; the shuffle goes on with what is cached
        run.log.error(f"{len(failed)} batch(es) failed to cache and are left out: "
                      + "; ".join(f"{k}: {r.splitlines()[0]}" for k, r in sorted(failed.items())))
    run.log.info(f"{plan.n_rows:,} rows, {plan.n_passes} pass(es), K={plan.n_buckets}, "
                 f"budget {plan.memory_budget_bytes / 2**20:.0f} MiB")
    return {
        "plan_id": shuffle_run.plan_id, "n_rows": plan.n_rows, "n_passes": plan.n_passes,
        "n_buckets": plan.n_buckets, "memory_budget_bytes": plan.memory_budget_bytes,
        "data_bytes": plan.n_rows * plan.record_bytes, "n_inputs": len(shuffle_run.inputs),
        "final_buckets": plan.n_final_buckets,
        "inputs": MetadataValue.json([{"key": i["key"], "version": i["version"]} for i in shuffle_run.inputs]),
        "failed_batches": MetadataValue.json(failed),
        "stores": MetadataValue.json([{"store": catalog.shuffled_name(n), "hook_name": h, "plan_id": r.plan_id}
                                      for n, h, r in zip(names, cached_hook_points(run.store) or ["(default)"], runs,
                                                         strict=False)]),
    }


def _worker_jobs(workers: set[int], n_jobs: int) -> list[int]:
    """Jobs of the workers a run covers: one worker per run in a backfill, all in a ranged run."""
    return [job for job in range(n_jobs) if job % N_SHUFFLE_WORKERS in workers]


def _workers(run: StageRun) -> set[int]:
    return {int(key) for key in run.partition_keys}


def scatter(pass_index: int):
    def scatter_pass(run: StageRun) -> dict:
        """Scatter pass ``pass_index`` for the run's workers; nothing when the plan does not need it."""
        totals = {"rows": 0, "bytes_read": 0, "bytes_written": 0, "seconds": 0.0}
        ids, needed = [], False
        for name in _names(run):
            shuffle_run = sh.load_run(run.store, name)
            ids.append(shuffle_run.plan_id)
            if pass_index >= shuffle_run.plan.n_passes:
                run.log.info(f"{catalog.shuffled_name(name)}: the plan has {shuffle_run.plan.n_passes} pass(es): "
                             f"scatter pass {pass_index} is not needed")
                continue
            needed = True
            jobs = _worker_jobs(_workers(run), shuffle_run.plan.jobs_in_pass(pass_index))
            for job in jobs:
                result = sh.scatter_job(run.store, name, pass_index, job)
                run.log.info(f"{name} pass {pass_index} job {job}: {result['rows']:,} rows in "
                             f"{result['seconds']:.1f} s")
                for key in totals:
                    totals[key] += result[key]
        if not needed:
            return {"plan_id": "+".join(ids), "needed": False, "rows": 0}
        return {"plan_id": "+".join(ids), "needed": True, **totals,
                "GB_per_s": totals["bytes_written"] / max(totals["seconds"], 1e-9) / 1e9}

    scatter_pass.__name__ = scatter_pass.__qualname__ = f"scatter_pass_{pass_index}"  # the stage's name
    return scatter_pass


def shuffle_buckets(run: StageRun) -> dict:
    """The final pass: each final bucket fits in memory and gets an in-memory Fisher–Yates shuffle."""
    rows = seconds = n_buckets = 0
    ids = []
    for name in _names(run):
        shuffle_run = sh.load_run(run.store, name)
        ids.append(shuffle_run.plan_id)
        buckets = _worker_jobs(_workers(run), shuffle_run.plan.n_final_buckets)
        for bucket in buckets:
            result = sh.finalize_bucket(run.store, name, bucket)
            rows, seconds = rows + result["rows"], seconds + result["seconds"]
        n_buckets += len(buckets)
    run.log.info(f"{n_buckets} bucket(s), {rows:,} rows in {seconds:.1f} s")
    return {"plan_id": "+".join(ids), "buckets": n_buckets, "rows": rows, "seconds": seconds}


def commit_shuffle(run: StageRun) -> dict:
    names, stores, summaries = _names(run), [], []
    for name in names:
        summary = sh.commit_shuffled(run.store, name)
        summaries.append(summary)
        sh.delete_scratch(run.store, name)
        shuffled = open_shuffled(run.store, name)
        stores.append({"store": catalog.shuffled_name(name),
                       "hook_name": activation_attrs(run.store, name).get("hook_name"), "rows": shuffled.n_rows,
                       "d_model": shuffled.d_model, "plan_id": summary["plan_id"]})
    first = open_shuffled(run.store, names[0])
    return {
        "dagster/row_count": first.n_rows, "d_model": first.d_model, "dtype": first.dtype,
        "n_passes": summaries[0]["n_passes"], "plan_id": summaries[0]["plan_id"], "pieces": summaries[0]["pieces"],
        "hook_name": str(stores[0]["hook_name"]),
        "path": MetadataValue.path(run.store.url(run.store.resolve(catalog.shuffled_name(names[0])))),
        "stores": MetadataValue.json(stores),
    }


def check_permutation(run: StageRun) -> dict:
    results = {name: permutation_check(run.store, name) for name in _names(run)}
    passed = all(r["ok"] for r in results.values())
    if len(results) == 1:
        (result,) = results.values()
        return {"passed": bool(passed), "metadata": {k: v for k, v in result.items() if k != "ok"}}
    return {"passed": bool(passed), "metadata": {name: MetadataValue.json({k: v for k, v in r.items() if k != "ok"})
                                                 for name, r in results.items()}}


def uncommit(run: StageRun) -> str:
    """A store that is not a permutation of its inputs must never be trained on (all hook points go)."""
    names = _names(run)
    for name in names:
        run.store.delete(catalog.shuffled_name(name))
    return (f"{', '.join(catalog.shuffled_name(n) for n in names)} {'was' if len(names) == 1 else 'were'} uncommitted: "
            "nothing trains on it, and the next run shuffles again")


def check_uniformity(run: StageRun) -> dict:
    problems, metadata = [], None
    for name in _names(run):  # the first store's statistics; every store's problems
        stats = uniformity_stats(run.store, name)
        metadata = metadata or stats
        problems += [p if name == _settings(run).name else f"{name}: {p}" for p in uniformity_problems(stats)]
    return {"passed": not problems, "severity": AssetCheckSeverity.WARN,
            "metadata": {**metadata, "problems": "; ".join(problems) or "none"}}


def uniformity_problems(stats: dict, alpha: float = 1e-4) -> list[str]:
    """Thresholds a uniform shuffle fails with probability ~alpha each."""
    problems = []
    if stats["chi2_p"] < alpha or stats["chi2_mod_p"] < alpha:
        problems.append(f"chi² p={min(stats['chi2_p'], stats['chi2_mod_p']):.2g}")
    if abs(stats["spearman_z"]) > 4.5:
        problems.append(f"Spearman z={stats['spearman_z']:.1f}")
    expected = stats["adjacent_expected"] * (stats["n_rows"] - 1)
    if stats["adjacent_pairs"] > expected + 6 * expected**0.5 + 6:
        problems.append(f"{stats['adjacent_pairs']} adjacent input pairs kept (expected ~{expected:.1f})")
    if stats["ks_min_p"] < alpha:
        problems.append(f"KS p={stats['ks_min_p']:.2g}")
    return problems


# One job for the whole shuffle: a run over every worker partition (a range) is the shuffle in one process.
SHUFFLE_JOB = AssetJob("shuffle_activations", "Plan, scatter, finalize and commit the global shuffle of every cached "
                       "activation partition (one ranged run over the shuffle workers).")


def _worker_stage(asset: str, description: str, deps: tuple, body, kinds: set[str]) -> Stage:
    return Stage(asset=asset, group="shuffle", kinds=frozenset(kinds), description=description,
                 partitions=SHUFFLE_WORKERS, deps=deps, resources=RESOURCES, up_to_date=store_holds_plan,
                 body=body, version=planned, job=SHUFFLE_JOB)


SHUFFLE_PLAN = Stage(
    asset="shuffle_plan", group="shuffle", kinds=frozenset({"numpy"}), job=SHUFFLE_JOB,
    description="Pin every committed activation partition and plan the passes from size, K and the budget.",
    deps=("activations",), resources=RESOURCES, up_to_date=plan_committed, body=plan_shuffle, version=planned)
SHUFFLE_PASS_1 = _worker_stage(
    "shuffle_pass_1", "Scatter pass 1: each job reads 1/N of the rows, sends each to one of "
    "K buckets.", ("shuffle_plan",), scatter(1), {"numpy"})
SHUFFLE_PASS_2 = _worker_stage(
    "shuffle_pass_2", "Scatter pass 2 (only when the plan needs it): splits each bucket K "
    "ways again.", ("shuffle_pass_1",), scatter(2), {"numpy"})
SHUFFLE_FINAL = _worker_stage(
    "shuffle_final", "The final pass: each final bucket fits in memory and gets an "
    "in-memory Fisher–Yates shuffle.", ("shuffle_pass_2",), shuffle_buckets, {"zarr"})
SHUFFLED_ACTIVATIONS = Stage(
    asset="shuffled_activations", group="shuffle", kinds=frozenset({"zarr"}), job=SHUFFLE_JOB,
    description="The training-ready store: every cached row once, in uniformly random order, for sequential reads.",
    deps=("shuffle_final",), resources=RESOURCES, up_to_date=store_holds_plan, body=commit_shuffle,
    version=committed,
    checks=(
        Check("shuffle_is_a_permutation", "Output is a permutation of the input: same count, no duplicate or "
              "missing ids, equal checksums over ids and activation bytes.", check_permutation, blocking=True,
              on_failure=uncommit),
        Check("shuffle_is_uniform", "Uniformity: chi² of source shard x output block, Spearman rho ~ 0, adjacent "
              "input pairs ~ 2/n, KS of each shard's positions.", check_uniformity),
    ))

STAGES = [SHUFFLE_PLAN, SHUFFLE_PASS_1, SHUFFLE_PASS_2, SHUFFLE_FINAL, SHUFFLED_ACTIVATIONS]
