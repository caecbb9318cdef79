"""``eval.py``'s machinery: image sources (folder, npz, dataset), sharded Inception feature extraction,
references (statistics files, folders, cached dataset statistics) and the evaluation itself."""

from .evaluate import EvalSettings, evaluate
from .features import extract_features
from .sources import DatasetImages, FolderImages, NpzImages, open_images

__all__ = ["EvalSettings", "evaluate", "extract_features", "open_images", "FolderImages", "NpzImages",
           "DatasetImages"]
