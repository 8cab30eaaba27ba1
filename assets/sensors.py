"""New text in the inbox becomes new activation partitions, each with a run request."""

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor

from assets.partitions import ACTIVATION_BATCHES
from resources import TextSourceResource
from sae_platform.errors import SourceError


def new_batch_keys(existing: set[str], text_source: TextSourceResource) -> list[str]:
    return [f.key for f in text_source.files() if f.key not in existing]


@sensor(job_name="cache_activations", minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING)
def inbox_sensor(context: SensorEvaluationContext, text_source: TextSourceResource):
    """Watch the text source; add a partition and request a caching run per new file."""
    try:
        new = new_batch_keys(set(context.instance.get_dynamic_partitions(ACTIVATION_BATCHES.name)), text_source)
    except SourceError as error:
        return SkipReason(str(error))
    if not new:
        return SkipReason("no new files in the inbox")
    context.log.info(f"{len(new)} new batch(es): {', '.join(new[:10])}")
    return SensorResult(
        run_requests=[RunRequest(partition_key=key, run_key=f"activations:{key}") for key in new],
        dynamic_partitions_requests=[ACTIVATION_BATCHES.build_add_request(new)],
    )
