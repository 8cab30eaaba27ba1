"""The multi-pass shuffle as assets: plan → scatter pass 1 → scatter pass 2 → final pass → shuffled store.

Each pass is partitioned by *worker*: worker w runs the pass's jobs j with j % N_WORKERS == w. A
backfill launches one run per worker, so the workers of a pass run side by side (run launcher or
Kubernetes/Celery); a single ranged run (partitions 0...N-1, what `sae-platform shuffle` and the
demo do) runs the whole shuffle in one process. How many
jobs a pass has comes from the plan (pass 1: N jobs; pass p: K^(p-1) jobs; final: one per bucket),
so the same assets serve any data size up to K²·M; a pass the plan does not need does nothing.
"""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from assets.activations import activations
from assets.partitions import N_SHUFFLE_WORKERS, SHUFFLE_WORKERS
from resources import ShuffleResource, StorageResource
from sae_platform import shuffle as sh
from sae_platform.errors import StorageError

MAX_SCATTER_PASSES = 2  # assets below: plans of up to 3 passes, i.e. K²·M of data


@asset(deps=[activations], group_name="shuffle", kinds={"numpy"})
def shuffle_plan(context: AssetExecutionContext, storage: StorageResource, shuffle: ShuffleResource) -> MaterializeResult:
    """Pin every committed activation partition and plan the passes from size, K and the budget."""
    return MaterializeResult(metadata=plan_shuffle(context.log, storage, shuffle))


def plan_shuffle(log, storage: StorageResource, shuffle: ShuffleResource) -> dict:
    store = storage.store()
    run = sh.start_shuffle(store, shuffle.name, n_buckets=shuffle.n_buckets,
                           memory_budget_bytes=shuffle.memory_budget_bytes, n_jobs=N_SHUFFLE_WORKERS,
                           seed=shuffle.seed)
    plan = run.plan
    if plan.n_passes - 1 > MAX_SCATTER_PASSES:
        raise StorageError(f"the data needs {plan.n_passes} passes; the pipeline defines {MAX_SCATTER_PASSES} "
                           "scatter passes plus the final one", "raise memory_budget_bytes or n_buckets")
    for warning in plan.warnings:
        log.warning(warning)
    log.info(f"{plan.n_rows:,} rows, {plan.n_passes} pass(es), K={plan.n_buckets}, "
             f"budget {plan.memory_budget_bytes / 2**20:.0f} MiB")
    return {
        "plan_id": run.plan_id, "n_rows": plan.n_rows, "n_passes": plan.n_passes, "n_buckets": plan.n_buckets,
        "memory_budget_bytes": plan.memory_budget_bytes, "data_bytes": plan.n_rows * plan.record_bytes,
        "n_inputs": len(run.inputs), "final_buckets": plan.n_final_buckets,
        "inputs": MetadataValue.json([{"key": i["key"], "version": i["version"]} for i in run.inputs]),
    }


def _worker_jobs(workers: set[int], n_jobs: int) -> list[int]:
    """Jobs of the workers a run covers: one worker per run in a backfill, all in a ranged run."""
    return [job for job in range(n_jobs) if job % N_SHUFFLE_WORKERS in workers]


def _workers(context: AssetExecutionContext) -> set[int]:
    return {int(key) for key in context.partition_keys}


def scatter(log, storage: StorageResource, shuffle: ShuffleResource, pass_index: int, workers: set[int]) -> dict:
    """Scatter pass ``pass_index`` for the jobs of ``workers``; nothing when the plan does not need the pass."""
    store = storage.store()
    run = sh.load_run(store, shuffle.name)
    if pass_index >= run.plan.n_passes:
        log.info(f"the plan has {run.plan.n_passes} pass(es): scatter pass {pass_index} is not needed")
        return {"plan_id": run.plan_id, "needed": False, "rows": 0}
    totals = {"rows": 0, "bytes_read": 0, "bytes_written": 0, "seconds": 0.0}
    jobs = _worker_jobs(workers, run.plan.jobs_in_pass(pass_index))
    for job in jobs:
        result = sh.scatter_job(store, shuffle.name, pass_index, job)
        log.info(f"pass {pass_index} job {job}: {result['rows']:,} rows in {result['seconds']:.1f} s")
        for key in totals:
            totals[key] += result[key]
    return {"plan_id": run.plan_id, "needed": True, "jobs": jobs, **totals,
            "GB_per_s": totals["bytes_written"] / max(totals["seconds"], 1e-9) / 1e9}


def _scatter_pass(pass_index: int):
    def scatter_asset(context: AssetExecutionContext, storage: StorageResource, shuffle: ShuffleResource):
        return MaterializeResult(metadata=scatter(context.log, storage, shuffle, pass_index, _workers(context)))

    return scatter_asset


shuffle_pass_1 = asset(name="shuffle_pass_1", deps=[shuffle_plan], partitions_def=SHUFFLE_WORKERS,
                       group_name="shuffle", kinds={"numpy"},
                       description="Scatter pass 1: each job reads 1/N of the rows, sends each to one of K buckets.",
                       )(_scatter_pass(1))
shuffle_pass_2 = asset(name="shuffle_pass_2", deps=[shuffle_pass_1], partitions_def=SHUFFLE_WORKERS,
                       group_name="shuffle", kinds={"numpy"},
                       description="Scatter pass 2 (only when the plan needs it): splits each bucket K ways again.",
                       )(_scatter_pass(2))


@asset(deps=[shuffle_pass_2], partitions_def=SHUFFLE_WORKERS, group_name="shuffle", kinds={"zarr"})
def shuffle_final(context: AssetExecutionContext, storage: StorageResource, shuffle: ShuffleResource) -> MaterializeResult:
    """The final pass: each final bucket fits in memory and gets an in-memory Fisher–Yates shuffle."""
    return MaterializeResult(metadata=finalize(context.log, storage, shuffle, _workers(context)))


def finalize(log, storage: StorageResource, shuffle: ShuffleResource, workers: set[int]) -> dict:
    store = storage.store()
    run = sh.load_run(store, shuffle.name)
    buckets = _worker_jobs(workers, run.plan.n_final_buckets)
    rows = seconds = 0
    for bucket in buckets:
        result = sh.finalize_bucket(store, shuffle.name, bucket)
        rows, seconds = rows + result["rows"], seconds + result["seconds"]
    log.info(f"{len(buckets)} bucket(s), {rows:,} rows in {seconds:.1f} s")
    return {"plan_id": run.plan_id, "buckets": len(buckets), "rows": rows, "seconds": round(seconds, 2)}


@asset(deps=[shuffle_final], group_name="shuffle", kinds={"zarr"})
def shuffled_activations(context: AssetExecutionContext, storage: StorageResource,
                         shuffle: ShuffleResource) -> MaterializeResult:
    """The training-ready store: every cached row once, in uniformly random order, for sequential reads."""
    return MaterializeResult(metadata=commit(storage, shuffle))


def commit(storage: StorageResource, shuffle: ShuffleResource) -> dict:
    store = storage.store()
    summary = sh.commit_shuffled(store, shuffle.name)
    sh.delete_scratch(store, shuffle.name)
    shuffled = sh.open_shuffled(store, shuffle.name)
    return {
        "n_rows": shuffled.n_rows, "d_model": shuffled.d_model, "dtype": shuffled.dtype,
        "n_passes": summary["n_passes"], "plan_id": summary["plan_id"], "pieces": summary["pieces"],
        "path": MetadataValue.path(store.url(store.resolve(f"{sh.SHUFFLED}/{shuffle.name}"))),
    }


@asset_check(asset=shuffled_activations, blocking=True,
             description="Output is a permutation of the input: same count, no duplicate or missing ids, "
                         "equal checksums over ids and activation bytes.")
def shuffle_is_a_permutation(storage: StorageResource, shuffle: ShuffleResource) -> AssetCheckResult:
    return AssetCheckResult(**check_permutation(storage, shuffle))


def check_permutation(storage: StorageResource, shuffle: ShuffleResource) -> dict:
    result = sh.permutation_check(storage.store(), shuffle.name)
    return {"passed": bool(result["ok"]), "metadata": {k: v for k, v in result.items() if k != "ok"}}


@asset_check(asset=shuffled_activations,
             description="Uniformity: chi² of source shard x output block, Spearman rho ~ 0, "
                         "adjacent input pairs ~ 2/n, KS of each shard's positions.")
def shuffle_is_uniform(storage: StorageResource, shuffle: ShuffleResource) -> AssetCheckResult:
    return AssetCheckResult(**check_uniformity(storage, shuffle))


def check_uniformity(storage: StorageResource, shuffle: ShuffleResource) -> dict:
    stats = sh.uniformity_stats(storage.store(), shuffle.name)
    problems = uniformity_problems(stats)
    return {"passed": not problems, "severity": AssetCheckSeverity.WARN,
            "metadata": {**stats, "problems": "; ".join(problems) or "none"}}


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


SHUFFLE_ASSETS = [shuffle_plan, shuffle_pass_1, shuffle_pass_2, shuffle_final, shuffled_activations]
SHUFFLE_CHECKS = [shuffle_is_a_permutation, shuffle_is_uniform]
