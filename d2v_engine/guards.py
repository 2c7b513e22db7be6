"""What stops a run from diverging or collapsing unnoticed: skipped steps and the collapse watchdog.

    nan_unless_finite(loss)   the loss to back-propagate: itself, or NaN-scaled so that every gradient is NaN
    SkipStreak                optimizer steps skipped in a row, against `train.max_skipped_steps`
    CollapseWatchdog          logged steps with collapsed targets, against `train.collapse_window`

A step is skipped by the optimizer, never by the trainer's own decision: a non-finite loss makes
every gradient NaN (`nan_unless_finite`), and DeepSpeed's optimizers (ZeRO 1-3, bf16) skip a step
whose gradient norm is not finite, as `distributed.FiniteAdamW` does under ZeRO-0 in fp32. The
gradients are summed over the ranks before that check, so a NaN on one rank is a NaN on all of them
and every rank skips the same steps without a collective of its own. The trainer then reads the
outcome from `engine.was_step_applied()`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def nan_unless_finite(loss: Tensor) -> Tensor:
    """`loss` when it is finite, else `loss * NaN`, whose backward makes every gradient NaN.

    A loss that is infinite (say, an infinite target under smooth L1) can have finite gradients,
    which the optimizer would apply; scaled by NaN it cannot. Multiplying by 1.0 changes no bit of
    the loss or its gradients, and the test is on the device: no sync point.

    Args:
        loss: [] the micro-batch's loss.
    Returns:
        [] the loss to pass to `engine.backward`.
    """
    return loss * torch.where(loss.detach().isfinite(), 1.0, float("nan"))


@dataclass
class SkipStreak:
    """Optimizer steps skipped in a row; the run stops once there are more than `limit`."""

    limit: int
    in_a_row: int = 0

    def record(self, applied: bool) -> bool:
        """Count one step (`applied`: the optimizer updated the weights); True when the run must stop."""
        self.in_a_row = 0 if applied else self.in_a_row + 1
        return self.in_a_row > self.limit


@dataclass
class CollapseWatchdog:
    """Watches the target spreads of the metrics lines for a collapsed teacher.

    `target_var` (spread over the masked rows) falls to 0 when every target is alike;
    `target_sample_var` (spread across samples at one position) also when the targets depend on
    the position alone. Either one under `threshold` on `window` logged steps in a row is a
    collapse; it is reported once, and again only after the spreads recovered in between.
    """

    threshold: float
    window: int
    low: int = 0          # logged steps in a row under the threshold
    reported: bool = False

    def check(self, metrics: dict[str, float]) -> str | None:
        """The collapse sentence the first time the window fills; None on every other line."""
        spreads = (metrics["target_var"], metrics["target_sample_var"])
        if any(math.isnan(v) for v in spreads):   # a skipped step's line: neither sign
            return None
        if min(spreads) >= self.threshold:
            self.low, self.reported = 0, False
            return None
        self.low += 1
        if self.low < self.window or self.reported:
            return None
        self.reported = True
        return (f"step {metrics['step']}: the targets have collapsed: tvar {metrics['target_var']:.2e} "
                f"and tsvar {metrics['target_sample_var']:.2e}, one of them under "
                f"train.collapse_threshold={self.threshold:g} for {self.low} logged steps in a row")

    def state_dict(self) -> dict[str, Any]:
        return {"low": self.low, "reported": self.reported}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.low, self.reported = state["low"], state["reported"]
