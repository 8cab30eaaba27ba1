"""`device: auto` on a machine with several GPUs: one per rank or per process (no GPU needed)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from sae_platform.devices import claim_device, device_name, native_bf16
from sae_platform.errors import ModelError
from sae_platform.model import pick_device


def test_explicit_devices_are_kept_and_auto_follows_the_gpu_count(tmp_path):
    assert device_name("cpu", 8) == "cpu" and device_name("cuda:3", 8) == "cuda:3"
    assert device_name("auto", 0) == "cpu"
    assert device_name("auto", 1, locks=tmp_path) == "cuda:0"
    assert not list(tmp_path.iterdir()), "one GPU needs no claim"


def test_each_torchrun_rank_gets_its_own_gpu(tmp_path):
    assert [device_name("auto", 4, local_rank=r) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert device_name("cuda", 4, local_rank=5) == "cuda:1"


CLAIM = textwrap.dedent("""
    import sys, time
    from sae_platform.devices import device_name
    warnings = []
    print(device_name("auto", 2, locks=sys.argv[1], warn=warnings.append), bool(warnings), flush=True)
    print(device_name("auto", 2, locks=sys.argv[1]), flush=True)  # asked again: the same one
    sys.stdin.read()  # hold the claim until told to exit
""")


def test_concurrent_processes_claim_different_gpus_and_release_them_on_exit(tmp_path):
    def start():
        proc = subprocess.Popen([sys.executable, "-c", CLAIM, str(tmp_path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        first, again = proc.stdout.readline().split(), proc.stdout.readline().strip()
        assert first[0] == again
        return proc, first[0], first[1] == "True"

    a, b, c = start(), start(), start()
    try:
        assert {a[1], b[1]} == {"cuda:0", "cuda:1"} and not a[2] and not b[2]
        assert c[1] in ("cuda:0", "cuda:1") and c[2], "a third process shares a GPU and is warned"
        a[0].communicate("")
        d = start()
        d[0].communicate("")
        assert d[1] == a[1] and not d[2], "the GPU of an exited process is free again"
    finally:
        for proc, _, _ in (a, b, c):
            if proc.poll() is None:
                proc.communicate("")


def test_claim_is_stable_within_a_process(tmp_path):
    assert claim_device(3, tmp_path) == claim_device(3, tmp_path) == (0, True)


def test_pick_device_auto_is_cpu_without_cuda_and_cuda_is_refused(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert str(pick_device("auto")) == "cpu"
    with pytest.raises(ModelError, match="CUDA is not available"):
        pick_device("cuda")


def test_native_bf16_follows_the_cpu_instructions_and_cuda(monkeypatch):
    """bf16 is chosen only where it is fast: CUDA, or a CPU with AVX512-BF16 or AMX."""
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert native_bf16("cpu") is expected
    assert native_bf16(torch.device("cuda")) is True
    assert native_bf16("meta") is False
