"""Experiment grids: run arms × seeds at equal budget, evaluate checkpoints, report with uncertainty."""

from .grid import GridConfig, RunSpec, expand_runs, load_grid
from .runner import run_grid

__all__ = ["GridConfig", "RunSpec", "expand_runs", "load_grid", "run_grid"]
