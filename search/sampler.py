"""FLOPs-constrained strategy sampler: every draw is valid, seeded and indexable.

EagleEye draws each ratio uniformly in [0, max_ratio] and rejects strategies whose FLOPs miss the band
target +- tolerance; with tight bands and many groups nearly every draw is rejected. We keep its prior and
correct only the overall pruning strength: candidate i draws u ~ U[0,1]^G and a FLOPs level uniformly in the
band, then walks the one-parameter path r_g(s) = max_ratio * u_g**s (s > 0; every ratio shrinks as s grows,
so FLOPs rise monotonically from the all-max_ratio network towards the unpruned one) to the point where
FLOPs meet that level. The per-group ordering and spread of the uniform draw survive; strategies the
uniform draw already put in the band are reachable unchanged (s = 1). Integer channel counts make FLOPs a
step function of s; a draw whose steps jump over the band is redrawn from the same seeded stream.
"""
from __future__ import annotations

import numpy as np

from workers.groups import SpaceError

_GRID = np.geomspace(1e-3, 1e3, 49)  # first pass over s
_REFINE_STEPS = 33  # points per refinement pass inside the bracketing interval
_PASSES = 4
_MAX_DRAWS = 64


class StrategySampler:
    """Draws valid strategies: sample(i) is the i-th strategy of this seed, the same on every machine."""

    def __init__(self, space, flops_target: float, tolerance: float, max_ratio: float, seed: int = 0):
        if not 0 < flops_target < 1:
            raise SpaceError(f"search.flops_target: {flops_target} is outside (0, 1)")
        if not tolerance > 0:
            raise SpaceError(f"search.tolerance: {tolerance} must be > 0")
        if not 0 < max_ratio < 1:
            raise SpaceError(f"search.max_ratio: {max_ratio} is outside (0, 1)")
        self.space, self.seed = space, int(seed)
        self.flops_target, self.tolerance, self.max_ratio = flops_target, tolerance, max_ratio
        lowest, highest = space.flops_range(max_ratio)
        self.band = (max(flops_target - tolerance, lowest), min(flops_target + tolerance, highest))
        if self.band[0] > self.band[1]:
            raise SpaceError(
                f"search.flops_target: {flops_target} +- {tolerance} is not reachable with "
                f"search.max_ratio={max_ratio}; the reachable FLOPs range is [{lowest:.4f}, {highest:.4f}] "
                f"of the unpruned network")

    def sample(self, i: int) -> list[float]:
        """The i-th strategy (one ratio per group) of this sampler's seed."""
        rng = np.random.default_rng([self.seed, int(i)])
        base = self.space.base_flops
        lo, hi = self.band[0] * base, self.band[1] * base
        for _ in range(_MAX_DRAWS):
            u = rng.random(len(self.space.groups))
            level = rng.uniform(lo, hi)
            ratios = self._walk(u, level, lo, hi)
            if ratios is not None:
                return [float(r) for r in ratios]
        raise SpaceError(f"search.tolerance: no strategy within {self.tolerance} of FLOPs target "
                         f"{self.flops_target} found for candidate {i}; widen the tolerance")

    def sample_many(self, start: int, count: int) -> list[list[float]]:
        """Strategies start .. start+count-1."""
        return [self.sample(i) for i in range(start, start + count)]

    def _walk(self, u: np.ndarray, level: float, lo: float, hi: float) -> np.ndarray | None:
        """Ratios on the path max_ratio * u**s whose FLOPs are closest to `level`, if inside [lo, hi]."""
        u = np.clip(u, 1e-12, 1.0 - 1e-12)
        log_u = np.log(u)
        grid = _GRID
        for _ in range(_PASSES):
            ratios = self.max_ratio * np.exp(grid[:, None] * log_u[None, :])
            flops = self.space.flops_of_kept(self.space.kept_batch(ratios))
            best = int(np.argmin(np.abs(flops - level)))
            if lo <= flops[best] <= hi and abs(flops[best] - level) <= 0.05 * (hi - lo):
                return ratios[best]
            above = np.flatnonzero(flops >= level)
            if len(above) == 0 or above[0] == 0:
                return ratios[best] if lo <= flops[best] <= hi else None
            j = above[0]
            grid = np.linspace(grid[j - 1], grid[j], _REFINE_STEPS)
        return ratios[best] if lo <= flops[best] <= hi else None
