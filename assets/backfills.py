"""Which asset backfills the platform accepts.

*Materialize all* on the global asset graph launches one asset backfill over every stage and every
partition: with the sweep, that trains every SAE of config/sweep.yaml and runs each shuffle worker,
feature shard and batch as its own run, dozens of runs for what ``full_pipeline`` does in one. So a
backfill may cover the stages of one group (e.g. every activation batch, or every sweep SAE); one that
spans several groups is refused with a message that says what to launch instead.

Dagster offers no hook before a backfill's first runs launch (the backfill daemon submits them on its
next tick; a sensor checking new backfills could not be sure to come first), so the refusal happens
in those first runs, before anything is read or written, and leaves nothing red:

* the backfill is marked canceled at once, with the message as its error (the backfill's page: status
  *Canceled* and the message, no stack trace). It is set to CANCELED directly, not CANCELING: the
  daemon would then cancel the backfill's other first runs, and a canceled run counts its assets'
  partitions as failed on the backfill's page; left alone, each refuses itself the same way;
* the run materializes nothing and does not fail (the stage assets' output is optional): it logs the
  message at error level and ends; the assets keep the state they had (no failed partition, no failed
  latest run), and the backfill launches nothing further.
"""

import time

from dagster import AssetExecutionContext
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.execution.backfill import BULK_ACTION_TERMINAL_STATUSES, BulkActionStatus, PartitionBackfill
from dagster._utils.error import SerializableErrorInfo

from sae_platform.errors import PlatformError

BACKFILL_TAG = "dagster/backfill"


def cross_group_refusal(backfill_id: str, selection: list[str],
                        groups_by_asset: dict[str, str]) -> PlatformError | None:
    """Why a backfill of the assets ``selection`` (asset keys as user strings) is refused: it spans
    several groups of ``groups_by_asset`` (an asset not in it counts as group "?"); None when it is not."""
    groups = sorted({groups_by_asset.get(key, "?") for key in selection})
    if len(groups) <= 1:
        return None
    return PlatformError(
        f"backfill {backfill_id} covers {len(selection)} assets in {len(groups)} groups ({', '.join(groups)}): "
        "Materialize all would run every stage of every partition, training every SAE of the sweep, "
        "as dozens of separate runs; it is refused and canceled, nothing was read or written",
        "launch the whole chain as one run instead: the full_pipeline job (Launchpad: pre-filled with "
        "SAE_PLATFORM_RUN_CONFIG), `make demo`, or `dagster job execute -m jobs.definitions -j full_pipeline "
        "-c config/demo.yaml`; to backfill one stage, select the assets of one group")


def refuse_cross_stage_backfill(groups_by_asset: dict[str, str]):
    """A guard for every stage asset (see ``assets.stage.stage_asset``): for a run of a backfill that
    spans several groups, cancels the backfill with the reason as its error and returns the reason
    (the run then materializes nothing); None for every other run."""

    def guard(context: AssetExecutionContext) -> str | None:
        backfill_id = context.run.tags.get(BACKFILL_TAG)
        if not backfill_id:
            return None
        backfill = context.instance.get_backfill(backfill_id)
        selection = [key.to_user_string() for key in (backfill.asset_selection or [])] if backfill else []
        refusal = cross_group_refusal(backfill_id, selection, groups_by_asset)
        if refusal is None:
            return None
        if backfill.status not in BULK_ACTION_TERMINAL_STATUSES:
            context.instance.update_backfill(_canceled(backfill, refusal, context))
        return str(refusal)

    return guard


def _canceled(backfill: PartitionBackfill, refusal: PlatformError, context: AssetExecutionContext) -> PartitionBackfill:
    """The backfill canceled by ``refusal``: status CANCELED, the refusal as its error (message only, no
    stack), and nothing counted as requested, so its page shows every asset untouched rather than its
    first runs forever in progress (they end without materializing, and a canceled backfill is not
    looked at again)."""
    canceled = (backfill.with_status(BulkActionStatus.CANCELED)
                .with_error(SerializableErrorInfo(str(refusal), stack=[], cls_name=type(refusal).__name__))
                .with_end_timestamp(time.time()))
    if backfill.asset_backfill_data is None:  # stored serialized (an older Dagster's backfill): left as it is
        return canceled
    untouched = backfill.asset_backfill_data.replace_requested_subset(AssetGraphSubset())
    # stored as is (the graph serializes only the older form)
    return canceled.with_asset_backfill_data(untouched, dynamic_partitions_store=context.instance,
                                            asset_graph=context.job_def.asset_layer.asset_graph)
