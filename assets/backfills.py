"""Which asset backfills the platform accepts.

*Materialize all* on the global asset graph launches one asset backfill over every stage and every
partition: with the sweep, that trains every SAE of config/sweep.yaml and runs each shuffle worker,
feature shard and batch as its own run, dozens of runs for what ``full_pipeline`` does in one. So a
backfill may cover the stages of one group (e.g. every activation batch, or every sweep SAE); one that
spans several groups is refused, in its first run, before anything is read or written, with a message
that says what to launch instead.
"""

from dagster import AssetExecutionContext

from sae_platform.errors import PlatformError

BACKFILL_TAG = "dagster/backfill"


def refuse_cross_stage_backfill(groups_by_asset: dict[str, str]):
    """A guard for every stage asset: fails a run that belongs to a backfill spanning several groups."""

    def guard(context: AssetExecutionContext) -> None:
        backfill_id = context.run.tags.get(BACKFILL_TAG)
        if not backfill_id:
            return
        backfill = context.instance.get_backfill(backfill_id)
        selection = [key.to_user_string() for key in (backfill.asset_selection or [])] if backfill else []
        groups = sorted({groups_by_asset.get(key, "?") for key in selection})
        if len(groups) > 1:
            raise PlatformError(
                f"backfill {backfill_id} covers {len(selection)} assets in {len(groups)} groups ({', '.join(groups)}): "
                "Materialize all would run every stage of every partition, training every SAE of the sweep, "
                "as dozens of separate runs",
                "launch the whole chain as one run instead: the full_pipeline job (Launchpad: pre-filled with "
                "SAE_PLATFORM_RUN_CONFIG), `make demo`, or `dagster job execute -m jobs.definitions -j full_pipeline "
                "-c config/demo.yaml`; to backfill one stage, select the assets of one group")

    return guard
