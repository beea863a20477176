"""Budget-constrained strategy sampler: every draw is valid, seeded and indexable.

EagleEye draws each ratio uniformly in [0, max_ratio] and rejects strategies whose FLOPs miss the band
target +- tolerance; with tight bands and many groups nearly every draw is rejected. We keep its prior and
correct only the overall pruning strength: candidate i draws u ~ U[0,1]^G and a level uniformly in the band
(of FLOPs, or of whichever constraint the search has), then walks the one-parameter path r_g(s) = max_ratio *
u_g**s (s > 0; every ratio shrinks as s grows, so the measure rises monotonically from the all-max_ratio network
towards the unpruned one) to the point that meets that level. The per-group ordering and spread of the uniform
draw survive; strategies the uniform draw already put in the band are reachable unchanged (s = 1). Integer
channel counts make the measure a step function of s; a draw whose steps jump over the band is redrawn from
the same seeded stream.
"""
from __future__ import annotations

import numpy as np

from prunetune.workers.constraints import CONSTRAINTS, Constraint
from prunetune.workers.groups import SpaceError
from prunetune.workers.space import PruningSpace

_GRID = np.geomspace(1e-3, 1e3, 49)  # first pass over s
_REFINE_STEPS = 33  # points per refinement pass inside the bracketing interval
_PASSES = 4
_MAX_DRAWS = 64


class StrategySampler:
    """Draws valid strategies: sample(i) is the i-th strategy of this seed, the same on every machine."""

    def __init__(self, space: PruningSpace, target: float, tolerance: float, max_ratio: float, seed: int = 0,
                 constraint: Constraint = CONSTRAINTS["flops"]):
        if not 0 < target < 1:
            raise SpaceError(f"search.target: {target} is outside (0, 1)")
        if not tolerance > 0:
            raise SpaceError(f"search.tolerance: {tolerance} must be > 0")
        if not 0 < max_ratio < 1:
            raise SpaceError(f"search.max_ratio: {max_ratio} is outside (0, 1)")
        self.space, self.seed, self.constraint = space, int(seed), constraint
        self.target, self.tolerance, self.max_ratio = target, tolerance, max_ratio
        lowest = float(self._fraction(np.full((1, len(space.groups)), max_ratio))[0])
        self.band = (max(target - tolerance, lowest), min(target + tolerance, 1.0))
        if self.band[0] > self.band[1]:
            raise SpaceError(
                f"search.target: {constraint.name} {target} +- {tolerance} is not reachable with "
                f"search.max_ratio={max_ratio}; the reachable {constraint.name} range is [{lowest:.4f}, 1.0000] "
                f"of the unpruned network")

    def _fraction(self, ratios: np.ndarray) -> np.ndarray:
        return self.constraint.fraction(self.space, self.space.kept_batch(ratios))

    def sample(self, i: int) -> list[float]:
        """The i-th strategy (one ratio per group) of this sampler's seed."""
        rng = np.random.default_rng([self.seed, int(i)])
        lo, hi = self.band
        for _ in range(_MAX_DRAWS):
            u = rng.random(len(self.space.groups))
            level = rng.uniform(lo, hi)
            ratios = self._walk(u, level, lo, hi)
            if ratios is not None:
                return [float(r) for r in ratios]
        raise SpaceError(f"search.tolerance: no strategy within {self.tolerance} of the {self.constraint.name} "
                         f"target {self.target} found for candidate {i}; widen the tolerance")

    def _walk(self, u: np.ndarray, level: float, lo: float, hi: float) -> np.ndarray | None:
        """Ratios on the path max_ratio * u**s whose measure is closest to `level`, if inside [lo, hi]."""
        log_u = np.log(np.clip(u, 1e-12, 1.0 - 1e-12))
        grid = _GRID
        for _ in range(_PASSES):
            ratios = self.max_ratio * np.exp(grid[:, None] * log_u[None, :])
            values = self._fraction(ratios)
            best = int(np.argmin(np.abs(values - level)))
            if lo <= values[best] <= hi and abs(values[best] - level) <= 0.05 * (hi - lo):
                return ratios[best]
            above = np.flatnonzero(values >= level)
            if len(above) == 0 or above[0] == 0:
                return ratios[best] if lo <= values[best] <= hi else None
            j = above[0]
            grid = np.linspace(grid[j - 1], grid[j], _REFINE_STEPS)
        return ratios[best] if lo <= values[best] <= hi else None
