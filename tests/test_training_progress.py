"""sae_platform.training_progress: about ten progress lines per run, and a process's peak memory."""

import torch

from sae_platform.training_progress import peak_memory_bytes, peak_memory_per_rank, progress_reporter


def _row(step: int, n_steps: int) -> dict:
    return {"step": step, "n_steps": n_steps, "tokens": step * 256, "nmse": 0.5, "l0": 32.0, "dead_fraction": 0.0,
            "tokens_per_second": 1000.0}


def test_a_run_logs_one_line_per_tenth_of_its_steps_and_its_last_step():
    lines = []
    report = progress_reporter(lines.append)
    for step in range(1, 101):
        report(_row(step, 100))
    assert len(lines) == 10
    assert lines[0].startswith("step 10/100: 2,560 tokens, nmse 0.5000, L0 32.0")
    assert lines[-1].startswith("step 100/100")


def test_a_short_run_logs_each_step_at_most_once():
    lines = []
    report = progress_reporter(lines.append)
    for step in range(1, 4):
        report(_row(step, 3))
    assert [line.split(":")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]


def _resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_peak_memory_is_in_bytes_and_at_least_what_the_process_holds_now():
    held = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    resident = _resident_bytes()
    peaks = peak_memory_per_rank(torch.device("cpu"))  # no process group: this process alone
    assert len(peaks) == 1 and peaks[0] == peak_memory_bytes(torch.device("cpu"))
    assert peaks[0] >= 0.98 * resident and resident > held.numel() * 4  # ru_maxrss lags VmRSS by pages
