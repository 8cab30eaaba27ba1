"""Which asset backfills run: one group's (e.g. every activation batch) yes; Materialize all (every
group) is refused and canceled by its first run, before anything is written, saying what to launch
instead, with nothing failed."""

import logging
import time

from dagster import AssetKey, DagsterInstance
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill

from assets import GROUPS
from jobs.definitions import build_definitions
from jobs.settings import Settings


def _backfill(instance, keys: list[str]) -> str:
    backfill = PartitionBackfill(backfill_id=f"b{len(keys)}", status=BulkActionStatus.REQUESTED, from_failure=False,
                                 tags={}, backfill_timestamp=time.time(), asset_selection=[AssetKey(k) for k in keys],
                                 serialized_asset_backfill_data="{}")
    instance.add_backfill(backfill)
    return backfill.backfill_id


def test_materialize_all_is_refused_and_canceled_with_nothing_red(tmp_path):
    """The backfill's first run cancels the backfill with the message as its error (no stack trace), logs
    it at error level, and ends without materializing and without failing: no asset turns red."""
    settings = Settings(root_url=str(tmp_path / "artifacts"), data_dir=str(tmp_path),
                        inbox=str(tmp_path / "inbox" / "*"), s3_endpoint_url=None)
    defs = build_definitions(settings)
    instance = DagsterInstance.ephemeral()
    every_asset = _backfill(instance, sorted(GROUPS))
    result = defs.resolve_job_def("prepare_base_model").execute_in_process(
        instance=instance, tags={"dagster/backfill": every_asset}, raise_on_error=False)
    assert result.success, "a refused run does not fail"
    assert result.get_asset_materialization_events() == []
    backfill = instance.get_backfill(every_asset)
    assert backfill.status == BulkActionStatus.CANCELED
    message = backfill.error.message
    assert "Materialize all" in message and "full_pipeline" in message and "4 groups" in message, message
    assert "How to fix" in message and backfill.error.stack == []
    assert not any(event.is_step_failure for event in result.all_events)
    errors = [r.user_message for r in instance.all_logs(result.run_id) if r.level >= logging.ERROR]
    assert errors == [message], errors
    assert not (tmp_path / "artifacts").exists(), "refused before anything was written"
    # a second run of the backfill (launched before the cancel) refuses the same way and leaves the backfill be
    again = defs.resolve_job_def("prepare_base_model").execute_in_process(
        instance=instance, tags={"dagster/backfill": every_asset}, raise_on_error=False)
    assert again.success and again.get_asset_materialization_events() == []
    assert instance.get_backfill(every_asset) == backfill


def test_a_backfill_of_one_group_runs(tmp_path):
    settings = Settings(root_url=str(tmp_path / "artifacts"), data_dir=str(tmp_path),
                        inbox=str(tmp_path / "inbox" / "*"), s3_endpoint_url=None)
    defs = build_definitions(settings)
    instance = DagsterInstance.ephemeral()
    one_group = _backfill(instance, [k for k, g in GROUPS.items() if g == "shuffle"])
    result = defs.resolve_job_def("shuffle_activations").execute_in_process(
        instance=instance, tags={"dagster/backfill": one_group, "dagster/asset_partition_range_start": "0",
                                 "dagster/asset_partition_range_end": "3"}, raise_on_error=False)
    # it gets past the guard and fails on the real problem: nothing is cached yet
    message = result.failure_data_for_node("shuffle_plan").error.cause.message
    assert "no committed activation partitions" in message and "Materialize all" not in message
