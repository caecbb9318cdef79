"""Per-stage schedules of the sparsity curriculum (CS) and the Group-L1 weight (CR).

Both modes set one value per curriculum stage i = 0 … n−1, decaying from a start value to zero:

    linear   v_i = v_0·(n−1−i)/(n−1)             (seed 001: sparsity 0.8 → 0.8, 0.6, 0.4, 0.2, 0;
                                                   λ_max 3e-5 → 3e-5, 2.25e-5, 1.5e-5, 7.5e-6, 0)
    cosine   v_i = v_0·½·(1 + cos(π·i/(n−1)))     (seed 000: λ_max 5e-5 → 5e-5, 4.27e-5, 2.5e-5, 7.3e-6, 0)
    list     v_i = the i-th given value           (seed 000: sparsity [0.8, 0.6, 0.4, 0.2, 0.0])

``active_channels`` turns sparsities into channel counts with the rule that reproduces seed 001's table
(25, 51, 77, 102, 128 active of 128 for 0.8 over five stages): the first stage keeps
floor(C·(1−s_0)) channels (the seed's ``int()`` at construction: 25.6 → 25) and each later stage grows to
round(C·(1−s_i)) (51.2 → 51, 76.8 → 77, 102.4 → 102). Neither rule alone gives the table: floor gives
76 in stage 3, round gives 26 in stage 1.
"""

from __future__ import annotations

import math

from ..errors import UserError


def _linear(start: float, n: int) -> list[float]:
    return [start * (n - 1 - i) / (n - 1) for i in range(n)]


def _cosine(start: float, n: int) -> list[float]:
    return [start * 0.5 * (1.0 + math.cos(math.pi * i / (n - 1))) for i in range(n)]


SCHEDULES = {"linear": _linear, "cosine": _cosine}


def stage_values(kind: str, start: float, num_stages: int, per_stage=(), what: str = "value") -> list[float]:
    """The value of each of ``num_stages`` stages for schedule ``kind`` (`linear`, `cosine` or `list`).

    ``start`` is v_0 for the decaying schedules; ``per_stage`` the explicit list for `list`. Raises UserError
    when the list length does not match the stages, or a decaying schedule has fewer than 2 stages.
    """
    if kind == "list":
        if len(per_stage) != num_stages:
            raise UserError(f"the {what} schedule 'list' has {len(per_stage)} values but there are {num_stages} "
                            f"curriculum stages; give one value per stage in 'per_stage'")
        return [float(v) for v in per_stage]
    if kind not in SCHEDULES:
        raise UserError(f"unknown {what} schedule {kind!r}; choose one of {sorted(SCHEDULES) + ['list']}")
    if num_stages < 2:
        raise UserError(f"the {what} schedule {kind!r} decays over the stages and needs at least 2 curriculum "
                        f"stages; add stages or use schedule 'list'")
    return SCHEDULES[kind](float(start), num_stages)


def active_channels(channels: int, sparsities: list[float]) -> list[int]:
    """Active channels per stage for the given per-stage sparsities (see the module docstring for the rule).

    Raises UserError if the count would shrink from one stage to the next (channels are only regrown).
    """
    counts = []
    for i, s in enumerate(sparsities):
        if not 0.0 <= s <= 1.0:
            raise UserError(f"sparsity {s} of stage {i + 1} is outside [0, 1]")
        kept = channels * (1.0 - s)
        # 1e-9 absorbs float error such as 10·(1 − 0.9) = 0.9999999999999998; round() ties go to even.
        counts.append(math.floor(kept + 1e-9) if i == 0 else round(kept))
        if i and counts[-1] < counts[-2]:
            raise UserError(f"sparsity rises from stage {i} to stage {i + 1} ({sparsities[i - 1]} → {s}); masked "
                            f"channels are only ever regrown, so the sparsity must not increase")
    return counts


def stage_active_channels(cfg, channels: int | None = None) -> list[int]:
    """Mode CS: active channels per curriculum stage of ``cfg`` (a Config) among ``channels`` gated ones
    (default: the bottleneck's width; the decoder location applies it to each up block's input)."""
    sp, m = cfg.sparsity, cfg.model
    sparsities = stage_values(sp.schedule, sp.initial_sparsity, len(cfg.curriculum.stages), sp.per_stage, "sparsity")
    return active_channels(channels or m.ch_multipliers[-1] * m.hid_channels, sparsities)


def stage_lambdas(cfg) -> list[float]:
    """Mode CR: the Group-L1 weight λ per curriculum stage of ``cfg`` (a Config)."""
    reg = cfg.regularization
    lambdas = stage_values(reg.schedule, reg.lambda_max, len(cfg.curriculum.stages), reg.per_stage,
                           "regularization")
    if min(lambdas) < 0:
        raise UserError(f"'regularization.per_stage' = {reg.per_stage} has a negative λ; use values >= 0")
    return lambdas
