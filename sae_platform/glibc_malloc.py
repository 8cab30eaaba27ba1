"""glibc malloc settings the platform's long loops make, each for a measured reason.

A torch process allocates its big tensors with the C library's malloc, and glibc's defaults suit a
program of small objects, not one that frees and re-allocates the same 40 MB tensors thousands of
times:

- ``limit_arenas``: each thread gets its own malloc arena, which keeps what that thread freed.
  zarr reads on a thread pool, so a shuffle worker's peak grew to ~1.9x its memory budget; two
  arenas hold it at ~1.35x at no cost in speed (``sae_platform.shuffle``, docs/design.md "The
  shuffle").
- ``freed_blocks_reused``: a block above the mmap threshold (at most 32 MiB while glibc adapts it)
  is mapped fresh for each allocation and unmapped when freed, so every training step faulted in its
  38 MB gradients again, zeroed by the kernel: at 16,384 latents x d_model 576, batch 4,096, ~22,000
  page faults a step on 4 KiB pages, 7,570 with torch's huge pages (``sae_platform.enable_huge_pages``),
  80 inside this block, where freed blocks up to 256 MiB stay in the heap for the next step.
- ``fix_mmap_threshold`` and ``release_free_heap``: what the memory benchmarks use so that a job's
  resident set follows what it holds (``fix_mmap_threshold`` in benchmarks/scaling.py,
  ``release_free_heap`` in benchmarks/scaling_stages.py).

Each call returns whether it changed anything (True or False; none raises): False on other C libraries
(musl, macOS, where there is no ``mallopt``). ``limit_arenas`` and ``freed_blocks_reused`` also change
nothing where the operator already chose their setting in the environment (``MALLOC_ARENA_MAX``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or ``GLIBC_TUNABLES``): the operator's choice
wins. ``fix_mmap_threshold``, for measurements only, overrides it. mallopt's parameter numbers are
glibc's ``malloc.h``.
"""

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
DEFAULT_TRIM_THRESHOLD = 128 << 10  # glibc's, kept while the mmap threshold is fixed (it adapts neither then)
# The largest block freed_blocks_reused keeps in the heap, and the free heap it keeps: a 16,384-latent
# step's biggest blocks are its 38 MB gradients. Bigger ones (a 2^20-latent shard's 2.25 GiB) stay mapped:
# kept, they could raise the peak by fragments that size, and faulting them in is little against a step of
# seconds.
REUSED_BLOCK_LIMIT = 256 << 20
MMAP_THRESHOLD_CAP = 32 << 20  # the most some glibc versions accept for M_MMAP_THRESHOLD on 64-bit
# Where glibc's own adaptation of the thresholds ends (the cap, and trim twice it, once a mapped block that
# big is freed, as any torch process soon frees one): what freed_blocks_reused leaves, since no mallopt turns
# the adaptation back on.
ADAPTED_MMAP_THRESHOLD, ADAPTED_TRIM_THRESHOLD = MMAP_THRESHOLD_CAP, 2 * MMAP_THRESHOLD_CAP

_lock = threading.Lock()
_arenas_limited = False
_fixed_mmap_threshold: int | None = None
_reusing = 0  # depth of freed_blocks_reused blocks entered and not yet left, over all threads


def _mallopt(param: int, value: int) -> bool:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(ctypes.c_int(param), ctypes.c_int(value)))


# glibc's environment variable for each malloc tunable (``GLIBC_TUNABLES``' ``glibc.malloc.<tunable>``)
_VARIABLES = {"arena_max": "MALLOC_ARENA_MAX", "mmap_threshold": "MALLOC_MMAP_THRESHOLD_",
              "trim_threshold": "MALLOC_TRIM_THRESHOLD_"}


def _set_in_environment(*tunables: str) -> bool:
    """Whether the operator set any of ``tunables`` (``_VARIABLES``' keys), by variable or GLIBC_TUNABLES."""
    chosen = os.environ.get("GLIBC_TUNABLES", "")
    return any(_VARIABLES[name] in os.environ or f"glibc.malloc.{name}=" in chosen for name in tunables)


def limit_arenas(arenas: int) -> bool:
    """Limit this process to ``arenas`` malloc arenas (``mallopt(M_ARENA_MAX)``, what
    ``MALLOC_ARENA_MAX`` or ``GLIBC_TUNABLES=glibc.malloc.arena_max=N`` in the environment does, and an
    operator's setting there is left as set), so buffers freed by reader threads are reused
    rather than kept per thread. Once per process: it applies to arenas created from then on (glibc
    latches the limit when it first needs it) and stays. True if the limit was set here."""
    global _arenas_limited
    with _lock:
        if _arenas_limited or _set_in_environment("arena_max"):
            return False
        _arenas_limited = True
        return _mallopt(M_ARENA_MAX, arenas)


@contextlib.contextmanager
def freed_blocks_reused() -> Iterator[bool]:
    """Within: glibc keeps freed blocks up to ``REUSED_BLOCK_LIMIT`` (256 MiB; 32 MiB, its
    ``MMAP_THRESHOLD_CAP``, where glibc refuses a higher mmap threshold) in the heap, and up to 256 MiB
    of free heap, so they serve the next allocation instead of going back to the kernel (to be faulted
    in again, page by page). For a loop that allocates the same big tensors every step (training);
    yields whether freed blocks are reused within (False where nothing was changed, below).

    The resident set then stays near the loop's high-water mark until the block is left; on leaving,
    the free heap is handed back (``malloc_trim``) and the thresholds are set where glibc's adaptation
    ends (``ADAPTED_MMAP_THRESHOLD``, 32 MiB; trim 64 MiB): no mallopt turns the adaptation back on, and
    glibc's starting 128 KiB, fixed, mapped every block above it afresh for the rest of the process (7x
    the page faults of an adapted glibc for a loop of 4 MB tensors after training). Nested and
    concurrent blocks share one setting, restored when the last is left. Changes nothing where the
    environment chose the thresholds or ``fix_mmap_threshold`` did, and a block entered before
    ``fix_mmap_threshold`` leaves its threshold as fixed."""
    global _reusing
    with _lock:
        changed = _fixed_mmap_threshold is None and (_reusing > 0 or (
            not _set_in_environment("mmap_threshold", "trim_threshold")
            and (_mallopt(M_MMAP_THRESHOLD, REUSED_BLOCK_LIMIT) or _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CAP))
            and _mallopt(M_TRIM_THRESHOLD, REUSED_BLOCK_LIMIT)))
        _reusing += changed
    try:
        yield changed
    finally:
        with _lock:
            _reusing -= changed
            if changed and not _reusing:  # a threshold fixed meanwhile stays as fixed
                fixed = _fixed_mmap_threshold is not None
                _mallopt(M_MMAP_THRESHOLD, _fixed_mmap_threshold if fixed else ADAPTED_MMAP_THRESHOLD)
                _mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD if fixed else ADAPTED_TRIM_THRESHOLD)
                release_free_heap()


def fix_mmap_threshold(threshold: int) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, threshold)`` for the rest of the process (and the processes forked
    from it; as ``MALLOC_MMAP_THRESHOLD_`` in the environment): blocks above it are mapped and handed
    back when freed, and the threshold stops adapting. For memory measurements: glibc raises it after
    a mapped block is freed, so later blocks stay in the heap and a job's peak would depend on what
    ran before it in the process. ``freed_blocks_reused`` leaves it alone from then on. Unlike the
    other calls it overrides a threshold the operator set in the environment: a measurement needs
    its own. ``threshold`` in bytes; True if glibc accepted it."""
    global _fixed_mmap_threshold
    with _lock:
        _fixed_mmap_threshold = threshold
        return _mallopt(M_MMAP_THRESHOLD, threshold)


def release_free_heap() -> bool:
    """``malloc_trim(0)``: hand the heap's free pages back to the kernel. True if any were."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False
