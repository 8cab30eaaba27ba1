"""The ``step`` and ``train`` commands every peer side answers, timed the same way on each side.

Imports nothing of the platform nor of any peer (each peer's venv imports it beside its side module).
"""

import time


def step_ops(tensors: dict, sides: dict, run_step) -> dict:
    """``{"step": ..., "train": ...}`` over a side's ``DATA`` (``tensors``) and ``SIDES``; ``run_step(side, x)``
    runs one training step of that peer on rows ``x``. Both answer ``{"seconds": ...}``: the time
    of the steps alone."""

    def step(name: str, data: str, rows: int | None = None) -> dict:
        """One step on DATA[data] (its first ``rows`` rows); the seconds it took."""
        x = tensors[data] if rows is None else tensors[data][:rows]
        start = time.perf_counter()
        run_step(sides[name], x)
        return {"seconds": time.perf_counter() - start}

    def train(name: str, data: str, batch: int, steps: int) -> dict:
        """``steps`` steps over DATA[data] in order (batch i is rows [i*batch, (i+1)*batch), wrapping)."""
        x, seconds = tensors[data], 0.0
        for i in range(steps):
            lo = (i * batch) % (len(x) - batch + 1)
            start = time.perf_counter()
            run_step(sides[name], x[lo:lo + batch])
            seconds += time.perf_counter() - start
        return {"seconds": seconds}

    return {"step": step, "train": train}
