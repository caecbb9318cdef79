"""Evaluation metrics: FID (Inception port, streaming statistics, Fréchet distance), KID, precision/recall and
density/coverage, the twoscale oracle metrics, the bits/dim bound (likelihood), the power spectrum and the
feature net of the fd_classifier metric."""

from .fid import FeatureStats, frechet_distance, kernel_inception_distance, load_stats, save_stats
from .inception import FIDInceptionV3, load_fid_inception
from .oracle import twoscale_oracle_metrics
from .prdc import prdc

__all__ = ["frechet_distance", "kernel_inception_distance", "FeatureStats", "load_stats", "save_stats",
           "FIDInceptionV3", "load_fid_inception", "prdc", "twoscale_oracle_metrics"]
