"""Data-parallel SAE training with torch.distributed, launched by ``torchrun``.

With ``world_size`` W > 1 (``resources.training.config.world_size``) the training op starts
``torchrun --nproc_per_node N -m sae_platform.distributed <spec.json>`` and waits for it. Each of
the W ranks runs :func:`sae_platform.trainer.train_sae` with the same settings:

* batch b of the global schedule is rows [b·B, (b+1)·B) of the shuffled store, as in one process;
  rank r reads only its own disjoint slice [b·B + r·B/W, b·B + (r+1)·B/W) (B must divide by W);
* every rank starts from the same weights (same seed, same calibration rows, or the same
  checkpoint); after the backward pass the gradients are averaged over ranks (one all-reduce of
  all of them), so every rank takes the same Adam step and renormalises the same decoder rows;
* the dead-latent counters advance by the global batch and a latent counts as fired when it fired
  on any rank (an all-reduce MAX of the fired masks), so they are identical on every rank;
* only rank 0 writes checkpoints (atomically, through the same storage protocol) and the summary.

The MSE term is a mean over rows, so the average of the ranks' gradients is the gradient of the
global batch, and the result equals one process's at the same global batch up to float summation
order (tests/test_distributed.py). Two terms normalise by a statistic of the batch and use each
rank's slice instead, as sparsify and other data-parallel SAE trainers do: AuxK divides by the
variance of the residual, BatchTopK selects its top B·k activations per slice.

Backend: NCCL when the rank's device is CUDA (one GPU per rank: ``cuda:<LOCAL_RANK>``), gloo on
CPU. More than one machine: ``world_size`` = machines × ``nproc_per_node``; the op launches this
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

from sae_platform.errors import PlatformError

RDZV_ENV = "SAE_PLATFORM_RDZV_ENDPOINT"


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(parameters) -> None:
    """Replace every gradient by its mean over the ranks (one all-reduce of them all, flattened)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def fired_on_any_rank(fired: torch.Tensor) -> torch.Tensor:
    """bool [n_latents]: fired on at least one rank in this step."""
    counts = fired.to(torch.int32)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    return counts.bool()


def mean_over_ranks(row: dict) -> dict:
    """A metrics row with every float averaged over the ranks (ints, e.g. step and tokens, are global)."""
    keys = [k for k, v in row.items() if isinstance(v, float)]
    values = torch.tensor([row[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {**row, **{k: float(v) / dist.get_world_size() for k, v in zip(keys, values, strict=True)}}


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def launch_command(spec_path: str, world_size: int, nproc_per_node: int, run: str) -> list[str]:
    """torchrun's command line for one machine of a ``world_size``-rank training."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node)]
    nnodes = world_size // nproc_per_node
    if nnodes == 1:
        return [*command, "--standalone", "-m", "sae_platform.distributed", spec_path]
    endpoint = os.environ.get(RDZV_ENV)
    if not endpoint:
        raise PlatformError(f"world_size {world_size} with nproc_per_node {nproc_per_node} spans {nnodes} machines, "
                            f"but ${RDZV_ENV} (host:port where they meet) is not set",
                            f"set {RDZV_ENV} to host:port of the first machine, or world_size = nproc_per_node "
                            "for one machine")
    return [*command, "--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", f"sae-{run}", "-m", "sae_platform.distributed", spec_path]


def launch_training(store, shuffle_name: str, run: str, settings, device: str,
                    log: Callable[[str], None] = print) -> dict:
    """Train ``run`` on ``settings.world_size`` ranks with torchrun; returns rank 0's summary
    (what :func:`sae_platform.trainer.train_sae` returns). Raises TrainingError with the ranks'
    last output when torchrun fails; the committed checkpoint is then the last one rank 0 wrote,
    and launching again resumes from it."""
    from sae_platform.trainer import TrainingError

    nproc = settings.nproc_per_node or settings.world_size
    with tempfile.TemporaryDirectory(prefix="sae-ddp-") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps({
            "root_url": store.root_url, "storage_options": store.storage_options, "shuffle_name": shuffle_name,
            "run": run, "settings": asdict(settings), "device": device, "result": str(result_path)}))
        command = launch_command(str(spec_path), settings.world_size, nproc, run)
        log(f"training {run} data-parallel on {settings.world_size} ranks: {' '.join(command)}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        tail: list[str] = []
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            for line in proc.stdout:
                line = line.rstrip()
                tail = [*tail[-40:], line]
                if line:
                    log(line)
        if proc.returncode != 0 or not result_path.exists():
            raise TrainingError(f"data-parallel training of {run!r} failed (torchrun exit code {proc.returncode}): "
                                + "\n".join(tail[-15:]),
                                "see the ranks' output above; launching again resumes from the last committed "
                                "checkpoint")
        return json.loads(result_path.read_text())


def run_rank(spec: dict, on_metrics: Callable[[dict], None] | None = None) -> dict | None:
    """One rank's training (inside torchrun): join the process group, train, rank 0 writes the summary."""
    from sae_platform.model import pick_device
    from sae_platform.storage import ArtifactStore
    from sae_platform.trainer import TrainSettings, train_sae

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
    run_rank(json.loads(Path(sys.argv[1]).read_text()))
