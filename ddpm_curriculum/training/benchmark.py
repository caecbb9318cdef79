"""Timing for the benchmark scripts: candidates measured in interleaved rounds in one process, so a change in
machine load hits all of them alike and their ratio stays fair."""

from __future__ import annotations

import json
import time
from collections.abc import Callable


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, one entry per round; every function is warmed up once first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def print_result(result: dict, json_path: str | None = None) -> None:
    """Print ``result`` as JSON and, if asked, write it to ``json_path``."""
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
