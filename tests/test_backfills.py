"""Which asset backfills run: one group's (e.g. every activation batch) yes; Materialize all (every
group) is refused and canceled by its first run, before anything is written, saying what to launch
instead, with nothing failed."""

import logging
import time

from dagster import AssetKey, DagsterInstance
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.execution.asset_backfill import AssetBackfillStatus
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


def _materialize_all(instance, defs) -> str:
    """What the webserver stores for *Materialize all* (launchPartitionBackfill, allPartitions, every asset),
    with the backfill daemon's first tick done: the root base_model's run requested."""
    graph = defs.resolve_asset_graph()
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id="all", asset_graph=graph, partition_names=None, asset_selection=[AssetKey(k) for k in GROUPS],
        backfill_timestamp=time.time(), tags={}, dynamic_partitions_store=instance, all_partitions=True, title=None,
        description=None, run_config=None)
    data = backfill.asset_backfill_data
    requested = AssetGraphSubset.from_asset_partition_set({AssetKeyPartitionKey(AssetKey("base_model"))}, graph)
    instance.add_backfill(backfill.with_asset_backfill_data(
        data.replace_requested_subset(requested)._replace(requested_runs_for_target_roots=True),
        dynamic_partitions_store=instance, asset_graph=graph))
    return backfill.backfill_id


def test_materialize_all_is_refused_and_canceled_with_nothing_red(tmp_path):
    """The backfill's first run cancels the backfill with the message as its error (no stack trace), logs
    it at error level, and ends without materializing and without failing: no asset turns red, and the
    backfill's page shows it canceled with no asset failed or in progress."""
    settings = Settings(root_url=str(tmp_path / "artifacts"), data_dir=str(tmp_path),
                        inbox=str(tmp_path / "inbox" / "*"), s3_endpoint_url=None)
    defs = build_definitions(settings)
    instance = DagsterInstance.ephemeral()
    every_asset = _materialize_all(instance, defs)
    result = defs.resolve_job_def("prepare_base_model").execute_in_process(
        instance=instance, tags={"dagster/backfill": every_asset}, raise_on_error=False)
    assert result.success, "a refused run does not fail"
    assert not any(event.is_step_failure for event in result.all_events)
    assert result.get_asset_materialization_events() == []
    backfill = instance.get_backfill(every_asset)
    assert backfill.status == BulkActionStatus.CANCELED
    message = backfill.error.message
    assert "Materialize all" in message and "full_pipeline" in message and "4 groups" in message, message
    assert "How to fix" in message and backfill.error.stack == []
    errors = [r.user_message for r in instance.all_logs(result.run_id) if r.level >= logging.ERROR]
    assert errors == [message], errors
    statuses = backfill.asset_backfill_data.get_backfill_status_per_asset_key(defs.resolve_asset_graph())
    assert AssetKey("base_model") in [s.asset_key for s in statuses], statuses
    assert all(getattr(s, "backfill_status", None) is None and not getattr(s, "partitions_counts_by_status", {}).get(
        AssetBackfillStatus.IN_PROGRESS) for s in statuses), statuses
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
