"""Starting data-parallel SAE training under ``torchrun`` (the collectives: ``sae_platform.distributed``).

With ``world_size`` W > 1 (``resources.training.config.world_size``) the training op starts
``torchrun --nproc_per_node N -m sae_platform.launch <spec.json>`` and waits for it; each rank runs
:func:`run_rank`, which joins the process group (NCCL on CUDA, one GPU per rank; gloo on CPU) and
trains. More than one machine: ``world_size`` = machines × ``nproc_per_node``; the op launches this
machine's ranks with the rendezvous at ``$SAE_PLATFORM_RDZV_ENDPOINT`` (host:port of the first
machine) and each other machine runs the torchrun command the op logs.
"""

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from sae_platform.distributed import barrier, rank_and_world
from sae_platform.errors import PlatformError, require_counts
from sae_platform.model import pick_device
from sae_platform.storage import ArtifactStore
from sae_platform.trainer import TrainingError, TrainSettings, train_sae
from sae_platform.training_progress import progress_reporter

RDZV_ENV = "SAE_PLATFORM_RDZV_ENDPOINT"


def launch_command(spec_path: str, world_size: int, nproc_per_node: int, sae_name: str) -> list[str]:
    """torchrun's command line for one machine of a ``world_size``-rank training. Raises PlatformError
    when a count is not a positive integer, or the ranks span machines without a rendezvous."""
    require_counts({"world_size": world_size, "nproc_per_node": nproc_per_node}, where="resources.training.config.")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node)]
    nnodes = world_size // nproc_per_node
    if nnodes == 1:
        return [*command, "--standalone", "-m", "sae_platform.launch", spec_path]
    endpoint = os.environ.get(RDZV_ENV)
    if not endpoint:
        raise PlatformError(f"world_size {world_size} with nproc_per_node {nproc_per_node} spans {nnodes} machines, "
                            f"but ${RDZV_ENV} (host:port where they meet) is not set",
                            f"set {RDZV_ENV} to host:port of the first machine, or world_size = nproc_per_node "
                            "for one machine")
    return [*command, "--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", f"sae-{sae_name}", "-m", "sae_platform.launch", spec_path]


def launch_training(store, shuffle_name: str, sae_name: str, settings, device: str,
                    log: Callable[[str], None] = print) -> dict:
    """Train ``sae_name`` on ``settings.world_size`` ranks with torchrun; returns rank 0's summary
    (what :func:`sae_platform.trainer.train_sae` returns). Raises TrainingError with the ranks'
    last output when torchrun fails; the committed checkpoint is then the last one rank 0 wrote,
    and launching again resumes from it."""
    nproc = settings.nproc_per_node or settings.world_size
    with tempfile.TemporaryDirectory(prefix="sae-ddp-") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps({
            "root_url": store.root_url, "storage_options": store.storage_options, "shuffle_name": shuffle_name,
            "run": sae_name, "settings": asdict(settings), "device": device, "result": str(result_path)}))
        command = launch_command(str(spec_path), settings.world_size, nproc, sae_name)
        layout = f"{settings.data_parallel} data-parallel x {settings.latent_parallel} latent-parallel" \
            if settings.latent_parallel > 1 else "data-parallel"
        log(f"training {sae_name} {layout} on {settings.world_size} ranks: {' '.join(command)}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        tail: list[str] = []
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            for line in proc.stdout:
                line = line.rstrip()
                tail = [*tail[-40:], line]
                if line:
                    log(line)
        if proc.returncode != 0 or not result_path.exists():
            raise TrainingError(f"distributed training of {sae_name!r} failed "
                                f"(torchrun exit code {proc.returncode}): "
                                + "\n".join(tail[-15:]),
                                "see the ranks' output above; launching again resumes from the last committed "
                                "checkpoint")
        return json.loads(result_path.read_text())


def run_rank(spec: dict, on_metrics: Callable[[dict], None] | None = None) -> dict | None:
    """One rank's training (inside torchrun): join the process group, train, rank 0 writes the summary."""
    settings = TrainSettings(**spec["settings"])
    device = pick_device(spec.get("device", "auto"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        rank, world = rank_and_world()
        if world != settings.world_size:
            raise PlatformError(f"torchrun started {world} ranks but world_size is {settings.world_size}",
                                "launch with nproc_per_node × nnodes = world_size")
        store = ArtifactStore(spec["root_url"], spec.get("storage_options") or {})
        log = print if rank == 0 else (lambda message: None)
        result = train_sae(store, spec["shuffle_name"], spec["run"], settings, device, log=log,
                           on_metrics=on_metrics if rank == 0 else None)
        if rank == 0 and spec.get("result"):
            Path(spec["result"]).write_text(json.dumps(result))
        barrier()
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(json.loads(Path(sys.argv[1]).read_text()), on_metrics=progress_reporter(print))
