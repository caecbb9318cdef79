"""The stage plan: curriculum stages laid out in optimizer steps, and how stages advance (pacing).

With ``fixed`` pacing (the seeds) the stage is a pure function of the global step, so every rank (and a
resumed run) agrees on it without communication. Stage lengths given in epochs are converted with
``steps_per_epoch``; the last stage always runs to the end of training (the seeds list a length for it
that is only a lower bound).

With ``patience`` pacing (Kim et al. 2024) a stage's length is its maximum: it ends early once the
smoothed loss of its steps has not improved by a relative ``min_delta`` for ``patience`` steps. The
decision uses the loss all-reduced over ranks, so every rank takes it at the same step, and the early
start steps and the smoothing state are part of the checkpoint, so a resumed run takes the same decisions.
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


def build_plan(cfg: Config, steps_per_epoch: int, starts: dict[int, int] | None = None) -> list[Stage]:
    """Stages with their step ranges; baseline = one full-range stage.

    ``starts`` maps a stage index to the step at which it actually started (stages that patience pacing
    advanced early); the other stages start where the previous one's full length ends.
    """
    if not cfg.curriculum.enabled:
        return [Stage(0, "full_range", 0.0, 1.0, 0, total_steps(cfg, steps_per_epoch))]
    return curriculum_layout(cfg, steps_per_epoch, starts)


def curriculum_layout(cfg: Config, steps_per_epoch: int, starts: dict[int, int] | None = None) -> list[Stage]:
    """``curriculum.stages`` laid out in steps, whether or not the curriculum is enabled (the matched-histogram
    baseline uses the layout of a curriculum it does not follow)."""
    total = total_steps(cfg, steps_per_epoch)
    stages, start = [], 0
    n = len(cfg.curriculum.stages)
    starts = starts or {}
    for i, st in enumerate(cfg.curriculum.stages):
        length = st.steps if st.steps is not None else st.epochs * steps_per_epoch
        end = total if i == n - 1 else starts.get(i + 1, start + length)
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


class FixedPacing:
    """The seeds' pacing: every stage lasts its configured length; nothing to decide or store."""

    def __init__(self, cfg: Config, steps_per_epoch: int):
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch

    def plan(self) -> list[Stage]:
        return build_plan(self.cfg, self.steps_per_epoch)

    def update(self, plan: list[Stage], step: int, loss: float) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PatiencePacing(FixedPacing):
    """Ends a stage early when its smoothed loss stops improving (see the module docstring)."""

    def __init__(self, cfg: Config, steps_per_epoch: int):
        super().__init__(cfg, steps_per_epoch)
        cur = cfg.curriculum
        self.patience, self.min_delta, self.smoothing = cur.patience, cur.min_delta, cur.loss_smoothing
        self.starts: dict[int, int] = {}
        self.tracking, self.smoothed, self.best, self.since = -1, None, None, 0

    def plan(self) -> list[Stage]:
        return build_plan(self.cfg, self.steps_per_epoch, self.starts)

    def update(self, plan: list[Stage], step: int, loss: float) -> bool:
        """Called after step ``step`` with that step's all-reduced mean loss; True if the stage ends now."""
        stage = stage_at(plan, step - 1)  # the stage that trained this step
        if stage.index != self.tracking:  # a new stage: watch its loss from scratch
            self.tracking, self.smoothed, self.best, self.since = stage.index, None, None, 0
        if stage.index == len(plan) - 1 or step >= stage.end_step:
            return False  # the last stage runs to the end; a full-length stage ends by itself
        self.smoothed = loss if self.smoothed is None else self.smoothing * self.smoothed + (1 - self.smoothing) * loss
        if self.best is None or self.smoothed < self.best * (1.0 - self.min_delta):
            self.best, self.since = self.smoothed, 0
        else:
            self.since += 1
        if self.since < self.patience:
            return False
        self.starts[stage.index + 1] = step
        return True

    def state_dict(self) -> dict:
        return {"starts": {str(k): v for k, v in self.starts.items()}, "tracking": self.tracking,
                "smoothed": self.smoothed, "best": self.best, "since": self.since}

    def load_state_dict(self, state: dict) -> None:
        if not state:  # a checkpoint written with fixed pacing: its stages so far ran their full length
            return
        self.starts = {int(k): int(v) for k, v in state["starts"].items()}
        self.tracking, self.smoothed = int(state["tracking"]), state["smoothed"]
        self.best, self.since = state["best"], int(state["since"])


PACINGS = {"fixed": FixedPacing, "patience": PatiencePacing}
