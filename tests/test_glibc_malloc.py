"""glibc_malloc: each setting is made once, changes what it claims (page faults counted by the kernel),
and leaves an operator's environment setting alone. Each case runs in a fresh interpreter: the settings
are process-wide."""

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GLIBC = platform.libc_ver()[0] == "glibc"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
BARE = {k: v for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


def run(script: str, env: dict | None = None):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env or BARE, check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_arena_limit_is_set_once_per_process_unless_the_environment_did():
    script = """
        import json
        from sae_platform import glibc_malloc
        print(json.dumps([glibc_malloc.limit_arenas(2), glibc_malloc.limit_arenas(2)]))
    """
    assert run(script) == ([True, False] if GLIBC else [False, False])
    assert run(script, {**BARE, "MALLOC_ARENA_MAX": "4"}) == [False, False]  # the operator's setting wins
    # ... however it is spelled (this one was overridden: only MALLOC_ARENA_MAX was looked for)
    assert run(script, {**BARE, "GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.arena_max=4"}) == [False, False]


# Page faults per round of allocating and filling two 48 MB tensors (torch's allocator asks for no huge
# pages; above glibc's largest adaptive mmap threshold, 32 MiB, so by default each is mapped afresh: ~23,400
# faults a round).
FAULTS = """
    import json, resource
    import torch
    from sae_platform import glibc_malloc

    def one_round():  # as a training step: a big tensor, another computed from it, both freed
        a = torch.full((12_000_000,), 1.0)
        return float((a * 2)[-1])

    def faults_per_round(rounds=8):
        for _ in range(2):  # the first rounds may fault in any setting
            one_round()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            one_round()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds

    def rss_mib():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 2**20
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc")
def test_freed_blocks_are_reused_within_and_handed_back_after():
    got = run(FAULTS + """
    outside = faults_per_round()
    with glibc_malloc.freed_blocks_reused() as reused:
        with glibc_malloc.freed_blocks_reused() as nested:
            pass
        faults_per_round()  # the heap settles into the blocks the rounds need
        within = faults_per_round()  # after a nested block was left: still on
        held = rss_mib()
    left = rss_mib()
    print(json.dumps(dict(reused=reused, nested=nested, outside=outside, within=within, held=held, left=left)))
    """)
    assert got["reused"] and got["nested"], got
    assert got["outside"] > 20_000, got  # mapped afresh each round
    assert got["within"] < 500, got  # the freed block serves the next round
    assert got["left"] < got["held"] - 90, got  # leaving handed the free heap (two 48 MB blocks) back


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc")
@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "262144"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}, None])
def test_an_environment_or_fixed_threshold_wins_over_freed_blocks_reused(env):
    got = run(FAULTS + f"""
    if {env is None}:
        glibc_malloc.fix_mmap_threshold(256 << 10)  # what the memory benchmarks do
    with glibc_malloc.freed_blocks_reused() as reused:
        within = faults_per_round()
    print(json.dumps(dict(reused=reused, within=within)))
    """, {**BARE, **(env or {})})
    assert not got["reused"] and got["within"] > 20_000, got


# Whether glibc serves a malloc of ``size`` bytes by mmap (above the mmap threshold): mallinfo2's count of
# mapped blocks, one malloc and free apart (glibc >= 2.33; mallinfo's int fields before).
MAPPED = """
    import ctypes, json
    from sae_platform import glibc_malloc

    _libc = ctypes.CDLL(None)
    _wide = hasattr(_libc, "mallinfo2")
    class _Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t if _wide else ctypes.c_int) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]
    _info = _libc.mallinfo2 if _wide else _libc.mallinfo
    _info.restype, _libc.malloc.restype = _Info, ctypes.c_void_p
    _libc.malloc.argtypes, _libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]

    def mapped(size):
        before = _info().hblks
        block = _libc.malloc(size)
        try:
            return _info().hblks > before
        finally:
            _libc.free(block)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc")
def test_a_threshold_fixed_inside_a_block_is_kept_when_the_block_is_left():
    """``fix_mmap_threshold`` while a ``freed_blocks_reused`` block is entered (a memory measurement begun
    in a process that trains): leaving the block set the threshold back to 128 KiB, undoing the fixed
    1 MiB, and a block nested after the fix said it reused freed blocks. Now the fixed threshold stays."""
    got = run(MAPPED + """
    with glibc_malloc.freed_blocks_reused() as reused:
        glibc_malloc.fix_mmap_threshold(1 << 20)
        with glibc_malloc.freed_blocks_reused() as nested:
            pass
    print(json.dumps(dict(reused=reused, nested=nested, small=mapped(512 << 10), big=mapped(2 << 20))))
    """)
    assert got == dict(reused=True, nested=False, small=False, big=True), got


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc")
def test_after_the_block_blocks_up_to_32_mib_are_reused_as_an_adapted_glibc_reuses_them():
    """Leaving the block set glibc's starting mmap threshold, 128 KiB, which mallopt fixes (glibc no longer
    adapts it): for the rest of the process (an evaluation after training, the next asset) every block above
    it was mapped afresh, ~1,500 faults a round of 4 MB tensors against ~200 before the block. Now the
    thresholds are left where glibc's adaptation ends (32 MiB; trim 64 MiB): those blocks stay in the heap,
    and a bigger one is still mapped and handed back (the 48 MB rounds of the test above)."""
    got = run(MAPPED + FAULTS + """
    def one_round():  # 4 MB: above 128 KiB, below 32 MiB
        a = torch.full((1_000_000,), 1.0)
        return float((a * 2)[-1])

    with glibc_malloc.freed_blocks_reused() as reused:
        pass
    after = faults_per_round(20)
    print(json.dumps(dict(reused=reused, after=after, small=mapped(4 << 20), big=mapped(48 << 20))))
    """)
    assert got["reused"] and not got["small"] and got["big"], got
    assert got["after"] < 500, got
