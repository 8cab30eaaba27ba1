"""Which device a process computes on, when a machine has several GPUs.

``device: auto`` used to mean ``cuda`` (that is, ``cuda:0``), so every training run, evaluation and
feature pass that a machine with 8 GPUs ran at once stacked on the first one. The rule now:

1. an explicit device (``cpu``, ``cuda:3``) is used as given: that is how a stage is pinned
   (``resources.<training|evaluation|features|language_model>.config.device``);
2. ``auto`` without CUDA is ``cpu``; with one GPU it is ``cuda:0``;
3. ``auto`` (or ``cuda``) in a rank of a ``torchrun`` launch is ``cuda:<LOCAL_RANK mod GPUs>``, one
   GPU per rank, as torch.distributed expects;
4. otherwise ``auto`` on a machine with several GPUs *claims* one: the first GPU whose lock file
   (``<lock dir>/cuda<i>.lock``, ``fcntl.flock``) no other process holds. The claim lasts as long
   as the process (a Dagster step's process, or a Celery worker's child), and a process asks once:
   it keeps its GPU for every later step it runs. When every GPU is claimed (more concurrent steps
   than GPUs: size the ``gpu`` pool to the GPU count) it shares ``cuda:<pid mod GPUs>`` and says so.

Which precision is fast on a device is decided here too (:func:`native_bf16`), once, for the base
model's autocast and the SAE training step's selection.

The lock directory is ``$SAE_PLATFORM_DEVICE_LOCKS`` (default: ``sae_platform-devices`` in the
system temp directory); it must be local to the machine, since the locks are per machine.
"""

import fcntl
import os
import tempfile
from pathlib import Path

import torch

LOCK_DIR_ENV = "SAE_PLATFORM_DEVICE_LOCKS"

_claimed: dict[str, tuple[int, object]] = {}  # lock dir -> (device index, open lock file kept for the claim)


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "sae_platform-devices")


def claim_device(n_devices: int, locks: Path | None = None) -> tuple[int, bool]:
    """(device index, whether it is this process's own): the first of ``n_devices`` that no other
    process on this machine holds, held until this process exits; ``pid mod n_devices`` (shared,
    False) when all are held. The same process always gets the same answer."""
    locks = Path(locks or lock_dir())
    key = str(locks.resolve()) if locks.exists() else str(locks)
    if key in _claimed:
        return _claimed[key][0], True
    locks.mkdir(parents=True, exist_ok=True)
    for index in range(n_devices):
        handle = open(locks / f"cuda{index}.lock", "a")  # noqa: SIM115 (kept open: the lock is the claim)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _claimed[key] = (index, handle)
        return index, True
    return os.getpid() % n_devices, False


def device_name(preference: str, n_cuda: int, local_rank: int | None = None, locks: Path | None = None,
                warn=None) -> str:
    """The device string for ``preference`` (``auto``, ``cpu``, ``cuda``, ``cuda:<i>``) on a
    machine with ``n_cuda`` GPUs, in torchrun rank ``local_rank`` (None: not a rank). Pure logic
    (no CUDA call), so it is tested without a GPU; :func:`sae_platform.model.pick_device` calls it."""
    if preference not in ("auto", "cuda"):
        return preference
    if n_cuda == 0:
        return "cpu" if preference == "auto" else "cuda"
    if local_rank is not None:
        return f"cuda:{local_rank % n_cuda}"
    if n_cuda == 1:
        return "cuda:0"
    index, own = claim_device(n_cuda, locks)
    if not own and warn:
        warn(f"all {n_cuda} GPUs are claimed by other processes on this machine: sharing cuda:{index} "
             "(limit the gpu pool to the number of GPUs, or pin a device in the stage's settings)")
    return f"cuda:{index}"


def local_rank() -> int | None:
    """This process's LOCAL_RANK when torchrun started it, else None."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value not in (None, "") else None


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively, i.e. several times faster than fp32:
    CUDA (tensor cores), or a CPU with AVX512-BF16 or AMX instructions (oneDNN's bf16 kernels;
    measured on this project's 2-core AMD EPYC: a 1024 x 576 x 16,384 matmul 3.8x faster, the
    SmolLM2 forward 2.9x). Elsewhere bf16 is emulated and slower than fp32, so ``auto`` settings
    keep fp32 there."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so guarded
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def auto_dtype(device: torch.device | str) -> torch.dtype | None:
    """What an ``auto`` precision setting means on ``device``: bfloat16 where it is native
    (:func:`native_bf16`), else None (keep float32)."""
    return torch.bfloat16 if native_bf16(device) else None
