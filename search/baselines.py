"""Baseline strategies every search evaluates first, so its report shows where the searched ones rank.

- `uniform`: one ratio for every group (the same fraction of every layer pruned), at the middle of the band;
- `global threshold`: one threshold on the criterion across all groups, as Network Slimming prunes: a group
  keeps the channels whose importance (normalised by the group's mean, except |gamma| for `bn_scale`, which is
  comparable across layers as it is) reaches the threshold, at most max_ratio of them pruned; the threshold is
  the one that puts the network at the middle of the band.
A baseline whose channel steps cannot reach the band (or that breaks a further budget there) is left out.
"""
from __future__ import annotations

import numpy as np

from .sampler import StrategySampler


def _closest(sampler: StrategySampler, candidates: np.ndarray) -> list[float] | None:
    """The candidate strategy (rows of [S, G]) closest to the middle of the band, if one is inside the band and
    under every further budget."""
    values = sampler.measure(candidates)
    middle = sum(sampler.band) / 2
    inside = np.flatnonzero(sampler.feasible(candidates))
    if not len(inside):
        return None
    return [float(r) for r in candidates[inside[np.argmin(np.abs(values[inside] - middle))]]]


def uniform(sampler: StrategySampler) -> list[float] | None:
    """One ratio for every group, at the middle of the band (None if no single ratio lands in the band)."""
    grid = np.linspace(0.0, sampler.max_ratio, 1401)
    return _closest(sampler, np.repeat(grid[:, None], len(sampler.space.groups), axis=1))


def global_threshold(sampler: StrategySampler, importance: list[np.ndarray], criterion: str) -> list[float] | None:
    """One importance threshold across all groups (importance per block position, as prune.position_importance
    gives it), at the middle of the band (None if no threshold lands in the band)."""
    scaled = importance if criterion == "bn_scale" else [imp / max(imp.mean(), 1e-12) for imp in importance]
    thresholds = np.unique(np.concatenate(scaled))
    rows = []
    for t in thresholds:
        ratios = []
        for g, imp in zip(sampler.space.groups, scaled):
            kept = max(int((imp >= t).sum()), int(np.ceil(len(imp) * (1 - sampler.max_ratio))), 1) * g.blocks
            ratios.append(min(max(1.0 - (kept + 0.5) / g.channels, 0.0), sampler.max_ratio))
        rows.append(ratios)
    return _closest(sampler, np.array(rows))


BASELINES = ("uniform", "global threshold")


def baselines(sampler: StrategySampler, importance: list[np.ndarray], criterion: str) -> list[tuple[str, list[float]]]:
    """The baselines that land in the band, as (name, strategy)."""
    found = list(zip(BASELINES, (uniform(sampler), global_threshold(sampler, importance, criterion))))
    return [(name, ratios) for name, ratios in found if ratios is not None]
