"""Baseline strategies every search evaluates first, so its report shows where the searched ones rank.

- `uniform`: one ratio for every group (the same fraction of every layer pruned), at the middle of the band;
- `global threshold`: one threshold on the criterion across all groups, as Network Slimming prunes: a group
  keeps the channels whose importance (normalised by the group's mean, except |gamma| for `bn_scale` and weight
  magnitudes for unstructured pruning, which are comparable across layers as they are: global magnitude
  pruning, as `torch.nn.utils.prune.global_unstructured` does) reaches the threshold, at most max_ratio of them
  pruned; the threshold is the one that puts the network at the middle of the band.
A baseline whose channel steps cannot reach the band (or that breaks a further budget there) is left out.
"""
from __future__ import annotations

import numpy as np

from .sampler import StrategySampler

_MAX_THRESHOLDS = 4001


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


def global_threshold(sampler: StrategySampler, importance: list[np.ndarray], comparable: bool) -> list[float] | None:
    """One importance threshold across all groups (importance per unit, as the method's `importance` gives
    it; divided by each group's mean unless `comparable`), at the middle of the band (None if no threshold lands
    in the band). Up to _MAX_THRESHOLDS thresholds are tried: every distinct value, or evenly spaced quantiles."""
    scaled = importance if comparable else [imp / max(imp.mean(), 1e-12) for imp in importance]
    values = np.unique(np.concatenate(scaled))
    thresholds = values if len(values) <= _MAX_THRESHOLDS else np.quantile(values, np.linspace(0, 1, _MAX_THRESHOLDS))
    rows = np.empty((len(thresholds), len(scaled)))
    for i, (g, imp) in enumerate(zip(sampler.space.groups, scaled)):
        reaching = len(imp) - np.searchsorted(np.sort(imp), thresholds, side="left")  # units at or above t
        kept = np.maximum(reaching, max(int(np.ceil(len(imp) * (1 - sampler.max_ratio))), 1)) * g.blocks
        rows[:, i] = np.clip(1.0 - (kept + 0.5) / g.units, 0.0, sampler.max_ratio)
    return _closest(sampler, rows)


BASELINES = ("uniform", "global threshold")


def baselines(sampler: StrategySampler, importance: list[np.ndarray], comparable: bool
              ) -> list[tuple[str, list[float]]]:
    """The baselines that land in the band, as (name, strategy)."""
    found = list(zip(BASELINES, (uniform(sampler), global_threshold(sampler, importance, comparable))))
    return [(name, ratios) for name, ratios in found if ratios is not None]
