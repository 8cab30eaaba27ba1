"""circuit-tracer exports: every transcoder set of the sweep (``catalog.TranscoderSet``) whose
layers are all trained, in circuit-tracer's layout (``sae_platform.circuit_tracer``)."""

import hashlib
import json

from dagster import AllPartitionMapping, AssetDep, MetadataValue

from assets.partitions import SWEEP_FILE
from assets.stage import AssetJob, Stage, StageRun
from sae_platform.catalog import circuit_tracer_name, load_transcoder_sets
from sae_platform.circuit_tracer import export_is_current, export_transcoder_set, set_checkpoints

TRANSCODER_SETS = load_transcoder_sets(SWEEP_FILE)


def export_sets(run: StageRun) -> dict:
    """Export each complete set not yet exported from its current checkpoints; a set with layers
    still untrained is reported and waits (the others go on)."""
    metadata = {"transcoder_sets": len(TRANSCODER_SETS)}
    for name, tset in TRANSCODER_SETS.items():
        waiting = [member for member, version in set_checkpoints(run.store, tset).items() if version is None]
        if waiting:
            run.log.info(f"transcoder set {name}: waiting for {len(waiting)} of {tset.n_layers} layers "
                         f"({', '.join(waiting[:4])}{', …' if len(waiting) > 4 else ''})")
            metadata[name] = f"waiting for {len(waiting)} of {tset.n_layers} layers"
        elif export_is_current(run.store, tset):
            metadata[name] = MetadataValue.path(run.store.url(run.store.resolve(circuit_tracer_name(name))))
        else:
            result = export_transcoder_set(run.store, tset)
            if "note" in result:
                run.log.warning(f"transcoder set {name}: {result['note']}")
            metadata[name] = MetadataValue.path(result["path"])
    return metadata


def exports_version(run: StageRun) -> str:
    """One hash of every set's committed export version."""
    versions = [(run.store.pointer(circuit_tracer_name(name)) or {}).get("version") for name in TRANSCODER_SETS]
    return hashlib.sha256(json.dumps(versions).encode()).hexdigest()[:16]


CIRCUIT_TRACER_EXPORT = Stage(
    asset="circuit_tracer_export", group="training", kinds=frozenset({"safetensors", "yaml"}),
    job=AssetJob("export_transcoder_sets", "Every complete transcoder set of the sweep in circuit-tracer's layout."),
    description="Each transcoder set of the sweep (a sweep entry with transcoder_set: one transcoder per MLP "
                "layer) whose layers are all trained, in circuit-tracer's layout: config.yaml (model_kind: "
                "transcoder_set) and layer_<i>.safetensors, under circuit_tracer/<set>.",
    deps=(AssetDep("sae_checkpoint", partition_mapping=AllPartitionMapping()),), body=export_sets,
    version=exports_version)

STAGES = [CIRCUIT_TRACER_EXPORT]
