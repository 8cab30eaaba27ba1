"""The learning-rate schedule of SAE training: the factor each step scales the configured lr by.

Why a schedule at all: a constant-lr Adam ends a short run where its last noisy steps left the
weights; decaying the lr linearly to zero over the run averages that noise out of the final weights,
which is what lets a run of a few hundred steps reach the FVU of a longer one (the same role
schedule-free averaging plays in eai-sparsify's default optimizer; its Adam path warms up and decays
linearly to zero over the run, ``transformers.get_linear_schedule_with_warmup``). Measurements:
docs/results.md, "The lr and its schedule against sparsify".

The factor is a pure function of the step, so a killed run resumes onto the very same lr (the
trainer sets every step's lr from its step, never from the optimizer's stored state).
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, get_args

from sae_platform.errors import PlatformError

if TYPE_CHECKING:  # the schedule itself is plain arithmetic
    import torch

LrSchedule = Literal["constant", "linear_decay"]
LR_SCHEDULES: tuple[LrSchedule, ...] = get_args(LrSchedule)


def lr_factor(schedule: LrSchedule, step: int, n_steps: int, warmup_steps: int = 0) -> float:
    """The factor in (0, 1] that scales the lr of step ``step`` (0-based: the step about to be taken)
    of a run of ``n_steps`` steps.

    The first ``warmup_steps`` steps ramp up linearly (1/w, 2/w, …, 1); then ``constant`` keeps 1
    and ``linear_decay`` falls linearly to 1/(steps left after the warm-up) at the last step (zero
    one step after the run). Raises PlatformError for an unknown schedule or a step outside
    [0, n_steps)."""
    if schedule not in LR_SCHEDULES:
        raise PlatformError(f"unknown lr schedule {schedule!r}", f"use one of {', '.join(LR_SCHEDULES)}")
    if not 0 <= step < n_steps:
        raise PlatformError(f"step {step} is outside the run's {n_steps} steps",
                            "pass the 0-based index of the step about to be taken")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return (n_steps - step) / max(1, n_steps - warmup_steps)


def base_lrs(optimizer: "torch.optim.Optimizer") -> list[float]:
    """The lr of each of ``optimizer``'s parameter groups as built (a variant may give a group its
    own lr, e.g. JumpReLU's thresholds): read before any step or resume changes them."""
    return [float(group["lr"]) for group in optimizer.param_groups]


def set_lr(optimizer: "torch.optim.Optimizer", base: Sequence[float], factor: float) -> None:
    """Set every parameter group's lr to its ``base`` lr times ``factor``."""
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        group["lr"] = lr * factor


def continued_lr(schedule: LrSchedule, lr: float, factor: float) -> str:
    """How a continuation (a finished run resumed for more steps, ``refresh.Continuation``) goes on,
    in words for its log line: ``factor`` is ``lr_factor`` at its first step. A decaying schedule is
    re-planned over the longer run: its lr rises back to that fraction of ``lr`` and decays to 0 again."""
    if schedule == "constant":
        return f"the same constant lr {lr:g}"
    return f"lr {lr:g} x {factor:.3g} ({schedule} re-planned over the longer run)"
