"""The instance's runs: where a run spent its time (`timings`), runs whose process died (`recover`)."""

import sys

from jobs.cli.common import _instance
from sae_platform.errors import PlatformError


def runs_are_local(instance) -> bool:
    """A SQLite instance lives in one machine's DAGSTER_HOME, so all its runs ran there."""
    return type(instance.run_storage).__name__.startswith("Sqlite")


def recover_dead_runs(instance, all_runs_on_this_host: bool = False) -> list[str]:
    """Mark runs whose process died (SIGKILL, OOM, a lost machine) as failed and free their pool slots.

    Dagster only learns that a run ended from the run itself; a killed run stays STARTED and keeps
    its `gpu` pool slot, so a re-launch would wait for it forever. Only runs of this machine are
    judged: their process id is the one on their events (on Kubernetes, use Dagster's run monitoring).
    """
    from dagster import DagsterRunStatus, RunsFilter

    from sae_platform.storage import process_alive

    if not runs_are_local(instance) and not all_runs_on_this_host:
        raise PlatformError(f"the instance's run storage ({type(instance.run_storage).__name__}) may be shared by "
                            "several machines, and a process id means nothing on another one",
                            "run `sae-platform recover --all-runs-on-this-host` only if every run of this "
                            "instance ran here; otherwise use Dagster's run monitoring or `dagster run delete`")
    recovered = []
    in_flight = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
    for run in instance.get_runs(filters=RunsFilter(statuses=in_flight)):
        pids = {e.dagster_event.pid for e in instance.all_logs(run.run_id) if e.dagster_event and e.dagster_event.pid}
        if not pids or any(process_alive(pid) for pid in pids):
            continue
        instance.report_run_failed(run, message=f"the run's process(es) {sorted(pids)} died; marked failed by "
                                                "`sae-platform recover` so its pool slots are freed")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovered.append(run.run_id)
    return recovered


def step_times(instance, run_id: str) -> tuple[list[tuple[str, int, float]], float]:
    """Step wall time summed per op of one run, slowest first, from its event log: [(op, steps,
    seconds)], and the run's wall time (first step start to last step end), in seconds."""
    stats = [s for s in instance.get_run_step_stats(run_id) if s.start_time and s.end_time]
    per_op: dict[str, list[float]] = {}
    for stat in stats:
        op = stat.step_key.split("[", 1)[0]  # a mapped step "op[key]" counts for its op
        per_op.setdefault(op, []).append(stat.end_time - stat.start_time)
    rows = sorted(((op, len(times), sum(times)) for op, times in per_op.items()), key=lambda row: -row[2])
    wall = max(s.end_time for s in stats) - min(s.start_time for s in stats) if stats else 0.0
    return rows, wall


def print_timings(instance, run_id: str) -> None:
    rows, wall = step_times(instance, run_id)
    total = sum(seconds for _, _, seconds in rows)
    print(f"\nrun {run_id}: {sum(n for _, n, _ in rows)} steps, {wall:.0f} s from the first step's start to the "
          f"last step's end; step time per op ({total:.0f} s in all):")
    for op, n, seconds in rows:
        print(f"  {op:<32} {n:>4} step(s) {seconds:>8.1f} s {100 * seconds / max(total, 1e-9):>5.1f}%")


def cmd_timings(args) -> int:
    instance = _instance()
    run_id = args.run_id
    if run_id is None:
        records = instance.get_run_records(limit=1)
        if not records:
            print("error: no runs in this instance ($DAGSTER_HOME) yet", file=sys.stderr)
            return 2
        run_id = records[0].dagster_run.run_id
    elif instance.get_run_by_id(run_id) is None:  # a prefix, as the UI shows (d422c996)?
        matches = [r.dagster_run.run_id for r in instance.get_run_records(limit=1000)
                   if r.dagster_run.run_id.startswith(run_id)]
        if len(matches) != 1:
            print(f"error: {'no' if not matches else len(matches)} run(s) {run_id}… in this instance ($DAGSTER_HOME); "
                  "give a whole run id or a unique prefix (`dagster run list` shows them)", file=sys.stderr)
            return 2
        run_id = matches[0]
    print_timings(instance, run_id)
    return 0


def cmd_recover(args) -> int:
    recovered = recover_dead_runs(_instance(), args.all_runs_on_this_host)
    print(f"{len(recovered)} dead run(s) marked failed, their pool slots freed" +
          (": " + ", ".join(recovered) if recovered else ""))
    return 0
