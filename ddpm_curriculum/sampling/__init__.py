"""Reproducible sampling: per-image noise streams, the sampler registry (``SAMPLERS``: ancestral DDPM, DDIM) and
batch sampling, and resumable, torchrun-sharded generation into a folder of PNGs (``generate.py``)."""

from .folder import GenerateResult, generate_to_folder, load_folder, sample_name, shard
from .noise import PerImageNoise, chunk_steps, image_seed
from .samplers import (SAMPLERS, Sampler, SamplerSpec, check_sampler_block, from_uint8, get_sampler,
                       normalize_sampler_dict, sample_batch, sampler_spec, spec_from_block, spec_from_sample_steps,
                       to_uint8)

__all__ = ["SAMPLERS", "Sampler", "SamplerSpec", "get_sampler", "spec_from_sample_steps", "sampler_spec",
           "spec_from_block", "check_sampler_block", "normalize_sampler_dict",
           "sample_batch", "to_uint8", "from_uint8", "PerImageNoise", "image_seed", "chunk_steps",
           "generate_to_folder", "GenerateResult", "load_folder", "sample_name", "shard"]
