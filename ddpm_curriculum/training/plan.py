"""The stage plan: curriculum stages laid out in optimizer steps.

The stage is a pure function of the global step, so every rank (and a resumed run) agrees on it
without communication. Stage lengths given in epochs are converted with ``steps_per_epoch``; the
last stage always runs to the end of training (the seeds list a length for it that is only a
lower bound).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ..config import Config
from ..errors import UserError


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    t_min: float  # fractions of T, as in the config
    t_max: float
    start_step: int  # first step of the stage
    end_step: int  # one past the last step

    @property
    def num_steps(self) -> int:
        return self.end_step - self.start_step


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    t = cfg.train
    return t.steps if t.steps is not None else t.epochs * steps_per_epoch


def build_plan(cfg: Config, steps_per_epoch: int) -> list[Stage]:
    """Stages with their step ranges; baseline = one full-range stage."""
    total = total_steps(cfg, steps_per_epoch)
    if not cfg.curriculum.enabled:
        return [Stage(0, "full_range", 0.0, 1.0, 0, total)]
    stages, start = [], 0
    n = len(cfg.curriculum.stages)
    for i, st in enumerate(cfg.curriculum.stages):
        length = st.steps if st.steps is not None else st.epochs * steps_per_epoch
        end = total if i == n - 1 else start + length
        if end > total or (i == n - 1 and start + length > total):
            raise UserError(f"curriculum stages need {start + length} steps but training has {total} "
                            f"({steps_per_epoch} steps per epoch); shorten the stages or train longer")
        if end <= start:
            raise UserError(f"curriculum stage {i} would be empty (steps {start}..{end}); "
                            f"shorten the earlier stages or train longer")
        stages.append(Stage(i, st.name or f"stage{i + 1}", st.t_min, st.t_max, start, end))
        start = end
    return stages


def stage_at(plan: list[Stage], step: int) -> Stage:
    """The stage that trains step ``step`` (the final stage for ``step >= total``)."""
    starts = [s.start_step for s in plan]
    return plan[max(0, bisect.bisect_right(starts, step) - 1)]
