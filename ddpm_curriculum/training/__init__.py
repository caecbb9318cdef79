"""Training: the CurriculumTrainer loop, stage plan, EMA, checkpoints and reporting."""

from .plan import Stage, build_plan, stage_at, total_steps
from .trainer import CurriculumTrainer, TrainingDiverged

__all__ = ["CurriculumTrainer", "TrainingDiverged", "Stage", "build_plan", "stage_at", "total_steps"]
