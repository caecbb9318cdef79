"""Evaluation metrics (twoscale oracle metrics; FID and precision/recall come with eval.py)."""

from .oracle import twoscale_oracle_metrics

__all__ = ["twoscale_oracle_metrics"]
