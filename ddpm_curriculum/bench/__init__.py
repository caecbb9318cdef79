"""Benchmarks behind ``scripts/bench.py``: training throughput against diffusers, machine peaks, mode
overheads, sampling and evaluation speed against diffusers and pytorch-fid, and peak memory."""
