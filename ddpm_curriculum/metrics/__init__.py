"""Evaluation metrics: FID (Inception port, streaming statistics, Fréchet distance), precision/recall and
density/coverage, and the twoscale oracle metrics."""

from .fid import FeatureStats, frechet_distance, load_stats, save_stats
from .inception import FIDInceptionV3, load_fid_inception
from .oracle import twoscale_oracle_metrics
from .prdc import prdc

__all__ = ["frechet_distance", "FeatureStats", "load_stats", "save_stats", "FIDInceptionV3",
           "load_fid_inception", "prdc", "twoscale_oracle_metrics"]
