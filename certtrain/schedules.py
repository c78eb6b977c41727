"""Schedules of ε, κ and β stepped every iteration; start and length are given in epochs.

A schedule is a pure function of the global (optimizer) step, so resuming from a checkpoint
restores it from ``trainer.global_step`` without any saved state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["ConstantSchedule", "LinearSchedule", "Schedule", "SmoothedSchedule", "build_schedule"]


class Schedule:
    """Base class: ``start_value`` before epoch ``start``, ``end_value`` from epoch ``start + length`` on."""

    def __init__(self, start_value: float = 0.0, end_value: float = 1.0, start: float = 0.0, length: float = 0.0):
        for name, v in (("start_value", start_value), ("end_value", end_value), ("start", start), ("length", length)):
            if not math.isfinite(float(v)):
                raise ValueError(f"{type(self).__name__}: {name} must be finite, got {v!r}")
        if start < 0 or length < 0:
            raise ValueError(f"{type(self).__name__}: start and length (epochs) must be >= 0, got {start}, {length}")
        self.start_value, self.end_value = float(start_value), float(end_value)
        self.start, self.length = float(start), float(length)

    def progress(self, t: float) -> float:
        """Ramp shape in [0, 1] at fraction ``t`` in [0, 1] of the ramp."""
        return t

    def value(self, step: int, steps_per_epoch: int) -> float:
        """Value at global step ``step`` (0 = first iteration) with ``steps_per_epoch`` steps per epoch."""
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        s0 = self.start * steps_per_epoch
        s1 = (self.start + self.length) * steps_per_epoch
        if step >= s1:
            return self.end_value
        if step <= s0:
            return self.start_value
        p = min(max(self.progress((step - s0) / (s1 - s0)), 0.0), 1.0)
        return self.start_value + (self.end_value - self.start_value) * p

    def end_step(self, steps_per_epoch: int) -> int:
        """First global step at which the schedule has reached ``end_value``."""
        return math.ceil((self.start + self.length) * steps_per_epoch)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(start_value={self.start_value}, end_value={self.end_value}, "
                f"start={self.start}, length={self.length})")


class ConstantSchedule(Schedule):
    """Always ``end_value`` (the target), e.g. for evaluation or training at a fixed ε."""

    def __init__(self, start_value: float = 0.0, end_value: float = 1.0, start: float = 0.0, length: float = 0.0):
        super().__init__(end_value, end_value, 0.0, 0.0)

    def value(self, step: int, steps_per_epoch: int) -> float:
        return self.end_value


class LinearSchedule(Schedule):
    """Linear ramp from ``start_value`` at epoch ``start`` to ``end_value`` at epoch ``start + length``."""


class SmoothedSchedule(Schedule):
    """Polynomial ramp ``t**exponent`` up to ``mid_point`` of the ramp, then linear (Shi et al. 2021).

    The linear part has the slope of the polynomial at ``mid_point`` (as auto_LiRPA's SmoothedScheduler),
    so the value and its derivative are continuous.
    """

    def __init__(self, start_value: float = 0.0, end_value: float = 1.0, start: float = 0.0, length: float = 0.0,
                 exponent: float = 4.0, mid_point: float = 0.25):
        super().__init__(start_value, end_value, start, length)
        if exponent < 1:
            raise ValueError(f"SmoothedSchedule: exponent must be >= 1, got {exponent}")
        if not 0 <= mid_point < 1:
            raise ValueError(f"SmoothedSchedule: mid_point must be in [0, 1), got {mid_point}")
        self.exponent, self.mid_point = float(exponent), float(mid_point)
        m, e = self.mid_point, self.exponent
        # p(t) = a t^e for t < m, linear after; p(1) = 1 and p'(m) continuous: a (m^e + e m^(e-1) (1 - m)) = 1
        self._a = 1.0 / (m ** e + e * m ** (e - 1) * (1 - m)) if m > 0 else 0.0
        self._mid = self._a * m ** e if m > 0 else 0.0

    def progress(self, t: float) -> float:
        if t < self.mid_point:
            return self._a * t ** self.exponent
        return self._mid + (1 - self._mid) * (t - self.mid_point) / (1 - self.mid_point)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", exponent={self.exponent}, mid_point={self.mid_point})"


SCHEDULES: dict[str, type[Schedule]] = {
    "constant": ConstantSchedule,
    "linear": LinearSchedule,
    "smoothed": SmoothedSchedule,
}


def build_schedule(cfg: Mapping[str, Any] | None, start_value: float, end_value: float) -> Schedule:
    """Schedule from a config ``{name: linear|smoothed|constant, start, length, [exponent, mid_point]}``."""
    cfg = dict(cfg or {"name": "constant"})
    name = str(cfg.pop("name", "linear"))
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; available: {', '.join(sorted(SCHEDULES))}")
    if name != "smoothed":
        cfg.pop("exponent", None)
        cfg.pop("mid_point", None)
    return SCHEDULES[name](start_value=start_value, end_value=end_value, **cfg)
