"""Reproducible sampling: per-image noise streams, DDIM / ancestral batch sampling, and resumable,
torchrun-sharded generation into a folder of PNGs (``generate.py``)."""

from .folder import GenerateResult, generate_to_folder, load_folder, sample_name, shard
from .noise import PerImageNoise, chunk_steps, image_seed
from .samplers import SamplerSpec, from_uint8, sample_batch, to_uint8

__all__ = ["SamplerSpec", "sample_batch", "to_uint8", "from_uint8", "PerImageNoise", "image_seed", "chunk_steps",
           "generate_to_folder", "GenerateResult", "load_folder", "sample_name", "shard"]
