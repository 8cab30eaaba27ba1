"""What a training run reports while it runs and when it ends: about ten progress lines per run, and
each rank's peak memory.

One process or torchrun's ranks (``sae_platform.launch``), the Dagster log shows the same lines: the
asset passes :func:`progress_reporter` to ``trainer.train_sae`` as ``on_metrics``; a rank launched by
torchrun prints them on rank 0, and the launcher forwards its output to the same log. The peak memory
is what sizing a wider run needs (docs/scale.md, docs/results.md: the 2^20-latent run).
"""

import resource
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist


def progress_line(row: dict, n_steps: int) -> str:
    """One progress line of a metrics row (``trainer._metrics_row``) of a run of ``n_steps`` steps."""
    return (f"step {row['step']:,}/{n_steps:,}: {row['tokens']:,} tokens, nmse {row['nmse']:.4f}, "
            f"L0 {row['l0']:.1f}, dead {row['dead_fraction']:.3f}, {row['tokens_per_second']:,.0f} tok/s")


def progress_reporter(log: Callable[[str], None]) -> Callable[[dict], None]:
    """``on_metrics`` for ``trainer.train_sae``: logs a metrics row each time the run passes another
    tenth of its steps (``row["n_steps"]``: the run's own count, a resumed continuation's included)."""
    logged = {"tenth": 0}

    def report(row: dict) -> None:
        tenth = 10 * row["step"] // row["n_steps"]
        if tenth > logged["tenth"]:
            logged["tenth"] = tenth
            log(progress_line(row, row["n_steps"]))

    return report


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory in bytes so far: on CUDA the most torch allocated on ``device``
    (``torch.cuda.max_memory_allocated``), elsewhere the peak resident set (``ru_maxrss``: KiB on
    Linux, bytes on macOS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_memory_per_rank(device: torch.device) -> list[int]:
    """[world size] every rank's :func:`peak_memory_bytes`, in rank order (a collective when
    torch.distributed is initialised: every rank calls it); one process: a list of one."""
    own = peak_memory_bytes(device)
    if not dist.is_initialized():
        return [own]
    peaks = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    peaks[dist.get_rank()] = own
    dist.all_reduce(peaks)
    return [int(p) for p in peaks.tolist()]
