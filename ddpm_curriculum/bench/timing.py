"""Timing helpers: candidates measured in interleaved rounds in one process, so a change in machine load hits
all of them alike and their ratio stays fair."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device) -> None:
    """Wait for queued CUDA work (no-op on the CPU), so a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, steps: int = 1,
                     device="cpu", first_call: dict | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, one entry per round; every function is warmed up once first.

    ``first_call``, if given, receives the seconds of each warm-up call (a compiled candidate compiles then)."""
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        sync(device)
        if first_call is not None:
            first_call[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def best(times: dict[str, list[float]]) -> dict[str, float]:
    """The fastest round of each candidate: the least disturbed by background load."""
    return {name: min(v) for name, v in times.items()}
