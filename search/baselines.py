"""Baseline strategies every search evaluates first (candidates 0, 1, ...), so its best score is at least theirs,
its report shows where the searched ones rank, and a learning algorithm refines around them.

- `uniform`: one ratio for every group (the same fraction of every layer pruned), at the middle of the band;
- `global threshold`: one threshold on the criterion across all groups, as Network Slimming prunes: a group
  keeps the channels whose importance (normalised by the group's mean, except |gamma| for `bn_scale` and weight
  magnitudes for unstructured pruning, which are comparable across layers as they are: global magnitude
  pruning, as `torch.nn.utils.prune.global_unstructured` does) reaches the threshold, at most max_ratio of them
  pruned; the threshold is the one that puts the network at the middle of the band;
- the strongest one-shot rules, each one global threshold on its own importance (channel pruning only):
  `global-l1-normalised` (Torch-Pruning's default global pruning: the L1 of each channel's weights in every layer
  of its group, divided by the group's mean), `global-taylor` (|w * dL/dw| likewise, from a few training batches)
  and `global-bn-scale` (the mean |gamma| of the group's BatchNorms, as it is);
- `global-l1-iterative`: Torch-Pruning's global pruning as users run it to a budget, `MetaPruner(global_pruning=True,
  GroupMagnitudeImportance(p=1), iterative_steps=N, max_pruning_ratio=search.max_ratio)` stepped up the channels:
  each step re-normalises the L1 over the channels left, so it prunes thin layers further and wide ones less than
  the one-shot threshold (`rankings.iterative_kept`); of the networks it passes through, the one nearest the
  middle of the band.
With a front (search.target a range or a list of budgets) every baseline is proposed at the middle of each budget's
band, the uniform ones at every budget first, so the report draws each rule's own curve beside the front.
A baseline whose channel steps cannot reach the band (or that breaks a further budget there), whose importance
the method or model does not have, or whose strategy an earlier baseline already has, is left out. A run keeps
the baselines it started with (`run_baselines`): which index is which never changes on resume.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config_file import ConfigError
from .sampler import StrategySampler

_MAX_THRESHOLDS = 4001


def _closest(sampler: StrategySampler, candidates: np.ndarray, band: int = 0) -> list[float] | None:
    """The candidate strategy (rows of [S, G]) closest to the middle of band `band`, if one is inside that band and
    under every further budget."""
    values = sampler.measure(candidates)
    middle = sum(sampler.bands[band]) / 2
    inside = np.flatnonzero(sampler.feasible(candidates) & (sampler.budget_of(candidates) == band))
    if not len(inside):
        return None
    return [float(r) for r in candidates[inside[np.argmin(np.abs(values[inside] - middle))]]]


def uniform(sampler: StrategySampler, band: int = 0) -> list[float] | None:
    """One ratio for every group, at the middle of band `band` (None if no single ratio lands in the band)."""
    grid = np.linspace(0.0, sampler.max_ratio, 1401)
    return _closest(sampler, np.repeat(grid[:, None], len(sampler.space.groups), axis=1), band)


def kept_ratios(sampler: StrategySampler, kept: np.ndarray) -> np.ndarray:
    """The strategies ([S, G] ratios) that keep `kept` block positions ([S, G]) of each group, at least those
    search.max_ratio leaves (ceil of (1 - max_ratio) of them, one at the least)."""
    rows = np.empty(kept.shape)
    for i, g in enumerate(sampler.space.groups):
        least = max(int(np.ceil(g.units // g.blocks * (1 - sampler.max_ratio))), 1)
        rows[:, i] = np.clip(1.0 - (np.maximum(kept[:, i], least) * g.blocks + 0.5) / g.units, 0.0, sampler.max_ratio)
    return rows


def global_threshold(sampler: StrategySampler, importance: list[np.ndarray], comparable: bool,
                     band: int = 0) -> list[float] | None:
    """One importance threshold across all groups (importance per unit, as the method's `importance` gives
    it; divided by each group's mean unless `comparable`), at the middle of band `band` (None if no threshold lands
    in the band). Up to _MAX_THRESHOLDS thresholds are tried: every distinct value, or evenly spaced quantiles."""
    scaled = importance if comparable else [imp / max(imp.mean(), 1e-12) for imp in importance]
    values = np.unique(np.concatenate(scaled))
    thresholds = values if len(values) <= _MAX_THRESHOLDS else np.quantile(values, np.linspace(0, 1, _MAX_THRESHOLDS))
    reaching = np.stack([len(imp) - np.searchsorted(np.sort(imp), thresholds, side="left")  # units at or above t
                         for imp in scaled], axis=1)
    return _closest(sampler, kept_ratios(sampler, reaching), band)


UNIFORM = "uniform"
BASELINES = (UNIFORM, "global threshold", "global-l1-normalised", "global-taylor", "global-bn-scale",
             "global-l1-iterative")
LEGACY = BASELINES[:2]  # what a run started before runs recorded their baselines proposed


@dataclass(frozen=True)
class Ranking:
    """One global rule: a threshold on its importance (per group, one value per unit: block position), or the path
    of a rule that steps (`path`: block positions each group keeps after each step, [S, G]); None where it has
    none."""

    name: str
    importance: list[np.ndarray] | None
    comparable: bool  # compared across groups as it is, not divided by each group's mean
    path: np.ndarray | None = None


def _ruled(sampler: StrategySampler, rule: Ranking, band: int) -> list[float] | None:
    """The strategy of `rule` at band `band`: the step of its path, or the threshold on its importance, that lands
    nearest the middle of the band (None if none lands in it or the rule has neither)."""
    if rule.path is not None:
        return _closest(sampler, kept_ratios(sampler, rule.path), band)
    return None if rule.importance is None else global_threshold(sampler, rule.importance, rule.comparable, band)


def run_baselines(recorded: list[str] | None, started: bool) -> tuple[str, ...]:
    """The baselines a run proposes: those its manifest records, LEGACY for a run that stored candidates before
    manifests recorded them, or all of BASELINES for a new run."""
    if recorded is not None:
        unknown = [name for name in recorded if name not in BASELINES]
        if unknown:
            raise ConfigError(f"output.dir: the run's baseline '{unknown[0]}' is unknown to this prunetune; resume "
                              "it with the version that started it")
        return tuple(recorded)
    return LEGACY if started else BASELINES


def baselines(sampler: StrategySampler, rankings: list[Ranking]) -> list[tuple[str, list[float]]]:
    """The uniform baseline and each ranking's strategy (a global threshold, or a step of its path), each at every
    budget's band, as (name, strategy), those that land in the band and differ from every earlier one, in that
    order."""
    bands = range(len(sampler.bands))
    found = [(UNIFORM, uniform(sampler, b)) for b in bands] + [(r.name, _ruled(sampler, r, b))
                                                               for r in rankings for b in bands]
    kept: list[tuple[str, list[float]]] = []
    for name, ratios in found:
        if ratios is not None and all(ratios != other for _, other in kept):
            kept.append((name, ratios))
    return kept
