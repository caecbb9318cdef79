"""Early stopping on the change of the smoothed train loss (seed 002's ``early_stop_loss_change``, made precise).

With loss_s the mean train loss of step s over the global batch (identical on every rank) and β the smoothing,

    L̄_1 = loss_1,   L̄_s = β·L̄_{s−1} + (1 − β)·loss_s,

training stops after step s when s is a multiple of the window W, s ≥ 2W, and

    |L̄_s − L̄_{s−W}| / L̄_{s−W} < threshold

(the loss changed by less than that fraction over the last W steps). A skipped step (non-finite loss) does not
enter L̄. The state (L̄, the last window's L̄, whether it stopped) is saved in checkpoints, so resumed runs stop
at the same step.
"""

from __future__ import annotations

import math


class EarlyStop:
    def __init__(self, threshold: float | None, window: int, smoothing: float):
        self.threshold, self.window, self.smoothing = threshold, window, smoothing
        self.smoothed: float | None = None  # L̄ after the last step
        self.previous: float | None = None  # L̄ at the last multiple of the window
        self.stopped_at: int | None = None
        self.last_change: float | None = None  # the relative change at the last window check

    @property
    def enabled(self) -> bool:
        return self.threshold is not None

    def update(self, step: int, loss: float | None) -> bool:
        """Record the loss of ``step`` (1-based); True when training should stop after it."""
        if not self.enabled or self.stopped_at is not None:
            return self.stopped_at is not None
        if loss is not None and math.isfinite(loss):
            b = self.smoothing
            self.smoothed = loss if self.smoothed is None else b * self.smoothed + (1 - b) * loss
        if step % self.window or self.smoothed is None:
            return False
        previous, self.previous = self.previous, self.smoothed
        if step < 2 * self.window or previous is None or previous == 0:
            return False
        self.last_change = abs(self.smoothed - previous) / abs(previous)
        if self.last_change < self.threshold:
            self.stopped_at = step
            return True
        return False

    def state_dict(self) -> dict:
        return {"smoothed": self.smoothed, "previous": self.previous, "stopped_at": self.stopped_at,
                "last_change": self.last_change}

    def load_state_dict(self, state: dict) -> None:
        self.smoothed, self.previous = state.get("smoothed"), state.get("previous")
        self.stopped_at, self.last_change = state.get("stopped_at"), state.get("last_change")
