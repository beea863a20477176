"""Budget-constrained strategy sampler: every draw is valid, seeded and indexable.

EagleEye draws each ratio uniformly in [0, max_ratio] and rejects strategies whose FLOPs miss the band
target +- tolerance; with tight bands and many groups nearly every draw is rejected. We keep its prior and
correct only the overall pruning strength: candidate i draws u ~ U[0,1]^G and a level uniformly in the band
(of FLOPs, or of whichever constraint the search has), then walks the one-parameter path r_g(s) = max_ratio *
u_g**s (s > 0; every ratio shrinks as s grows, so the measure rises monotonically from the all-max_ratio network
towards the unpruned one) to the point that meets that level. The per-group ordering and spread of the uniform
draw survive; strategies the uniform draw already put in the band are reachable unchanged (s = 1). Integer
channel counts make the measure a step function of s; a draw whose steps jump over the band is redrawn from
the same seeded stream. Further budgets (`search.limits`: params and latency under 60%, say) are upper bounds
on the same path: every measure rises with s, so they cut the path at a largest s, and the walk stays below it.

A target that is a range or a list of budgets (the accuracy-vs-cost front from one search) gives one band per
budget (`budget_bands`); the level v of the cube is split evenly among them (the budget i of n takes v in
[i/n, (i+1)/n)), so candidates spread evenly over the budgets and every candidate is inside its own budget's band.
"""
from __future__ import annotations

import copy

import numpy as np

from prunetune.workers.constraints import CONSTRAINTS, Budget, Constraint
from prunetune.workers.groups import SpaceError
from prunetune.workers.space import PruningSpace

_GRID = np.geomspace(1e-3, 1e3, 49)  # first pass over s
_REFINE_STEPS = 33  # points per refinement pass inside the bracketing interval
_PASSES = 4
_MAX_DRAWS = 64


def budget_bands(target: float | list[float], tolerance: float, points: int = 5) -> list[tuple[float, float]]:
    """The search's budgets as (budget, half width of its band): one target +- tolerance; a range [low, high] as
    `points` budgets evenly spaced from low to high, each band reaching half way to its neighbours; a list of 3 or
    more budgets, each +- tolerance."""
    if not isinstance(target, (list, tuple)):
        return [(target, tolerance)]
    if len(target) == 2:
        step = (target[1] - target[0]) / (points - 1)
        return [(round(target[0] + i * step, 12), round(step / 2, 12)) for i in range(points)]
    return [(float(b), tolerance) for b in target]


class StrategySampler:
    """Draws valid strategies: sample(i) is the i-th strategy of this seed, the same on every machine."""

    def __init__(self, space: PruningSpace, target: float | list[float], tolerance: float, max_ratio: float,
                 seed: int = 0, constraint: Constraint = CONSTRAINTS["flops"], limits: list[Budget] = (),
                 points: int = 5):
        if not all(0 < t < 1 for t in (target if isinstance(target, (list, tuple)) else [target])):
            raise SpaceError(f"search.target: {target} is outside (0, 1)")
        if not tolerance > 0:
            raise SpaceError(f"search.tolerance: {tolerance} must be > 0")
        if not 0 < max_ratio < 1:
            raise SpaceError(f"search.max_ratio: {max_ratio} is outside (0, 1)")
        self.space, self.seed, self.constraint = space, int(seed), constraint
        self.target, self.tolerance, self.max_ratio = target, tolerance, max_ratio
        lowest = float(self.measure(np.full((1, len(space.groups)), max_ratio))[0])
        self.budgets = budget_bands(target, tolerance, points)
        self.bands = [(max(b - t, lowest), min(b + t, 1.0)) for b, t in self.budgets]  # one per budget, rising
        for (b, t), (lo, hi) in zip(self.budgets, self.bands):
            if lo > hi:
                raise SpaceError(
                    f"search.target: {constraint.name} {b} +- {t} is not reachable with search.max_ratio={max_ratio}; "
                    f"the reachable {constraint.name} range is [{lowest:.4f}, 1.0000] of the unpruned network")
        self.limits = [(CONSTRAINTS[b.name], b.fraction(space)) for b in limits]
        most_pruned = space.kept_batch(np.full((1, len(space.groups)), max_ratio))
        for (limit, bound), budget in zip(self.limits, limits):
            least = float(limit.fraction(space, most_pruned)[0])
            if least > bound:
                raise SpaceError(f"search.limits.{budget.name}: {bound:.4f} of the unpruned network is not reachable "
                                 f"with search.max_ratio={max_ratio}; the most pruned network is at {least:.4f}")

    def bound(self, name: str, ratios=None) -> float | None:
        """The tightest upper bound on constraint `name` (a limit; the top of the band of the strategy `ratios`, of
        the highest band without one), as a fraction; None if none."""
        band = -1 if ratios is None else int(self.budget_of(np.asarray(ratios, dtype=np.float64)[None])[0])
        top = self.bands[band][1]
        bounds = [b for c, b in self.limits if c.name == name] + ([top] if self.constraint.name == name else [])
        return min(bounds) if bounds else None

    def budget_of(self, ratios: np.ndarray) -> np.ndarray:
        """For a [S, G] batch of ratios, the index of the budget each strategy belongs to: the band it is in, else
        the nearest one."""
        values = self.measure(ratios)[:, None]
        lo, hi = (np.array([band[end] for band in self.bands]) for end in (0, 1))
        return np.argmin(np.maximum(lo - values, 0) + np.maximum(values - hi, 0), axis=1)

    def within(self, budget: int) -> "StrategySampler":
        """This sampler with budget `budget`'s band alone (itself when it has one band): what a learning algorithm
        proposes in when it improves one budget of a front."""
        if len(self.bands) == 1:
            return self
        view = copy.copy(self)
        view.budgets, view.bands = [self.budgets[budget]], [self.bands[budget]]
        return view

    def within_limits(self, ratios: np.ndarray) -> np.ndarray:
        """For a [S, G] batch of ratios, True where every further budget (`search.limits`) is met."""
        ok = np.ones(len(ratios), dtype=bool)
        if not self.limits:
            return ok
        kept = self.space.kept_batch(ratios)
        for limit, bound in self.limits:
            ok &= limit.fraction(self.space, kept) <= bound * (1 + 1e-9)
        return ok

    def feasible(self, ratios: np.ndarray) -> np.ndarray:
        """For a [S, G] batch of ratios, True where the target's band and every further budget are met."""
        values = self.measure(ratios)[:, None]
        inside = ((values >= [lo for lo, _ in self.bands]) & (values <= [hi for _, hi in self.bands])).any(axis=1)
        return inside & self.within_limits(ratios)

    def measure(self, ratios: np.ndarray) -> np.ndarray:
        """The constraint's value of a [S, G] batch of ratios, as a fraction of the unpruned network."""
        return self.constraint.fraction(self.space, self.space.kept_batch(ratios))

    def sample(self, i: int) -> list[float]:
        """The i-th strategy (one ratio per group) of this sampler's seed."""
        rng = np.random.default_rng([self.seed, int(i)])
        for _ in range(_MAX_DRAWS):
            ratios = self.strategy(rng.random(len(self.space.groups)), rng.random())
            if ratios is not None:
                return [float(r) for r in ratios]
        raise SpaceError(f"search.tolerance: no strategy within {self.tolerance} of the {self.constraint.name} "
                         f"target {self.target} found for candidate {i}; widen the tolerance")

    def strategy(self, u: np.ndarray, v: float) -> np.ndarray | None:
        """The strategy at point (u, v) of the unit cube [0, 1]^(G+1): ratios on the path max_ratio * u**s whose
        measure is at level v of the bands (0 the low end of the lowest, 1 the high end of the highest; each band
        takes an equal share of v), or None where integer channel counts jump over the band. Any algorithm that
        proposes points of the cube proposes only valid strategies."""
        n = len(self.bands)
        i = min(int(float(v) * n), n - 1)
        lo, hi = self.bands[i]
        return self._walk(np.asarray(u, dtype=np.float64), lo + (float(v) * n - i) * (hi - lo), lo, hi)

    def position(self, ratios) -> tuple[np.ndarray, float]:
        """A point (u, v) of the unit cube whose strategy is `ratios` (u = ratios / max_ratio, at s = 1)."""
        r = self.space.check(ratios)
        measure = float(self.measure(r[None, :])[0])
        i = int(self.budget_of(r[None, :])[0])
        lo, hi = self.bands[i]
        within = float(np.clip((measure - lo) / max(hi - lo, 1e-12), 0.0, 1.0))
        return np.clip(r / self.max_ratio, 0.0, 1.0), (i + within) / len(self.bands)

    def contains(self, ratios) -> bool:
        """True if the strategy's measure is inside the band and under every further budget."""
        return bool(self.feasible(self.space.check(ratios)[None, :])[0])

    def _walk(self, u: np.ndarray, level: float, lo: float, hi: float) -> np.ndarray | None:
        """Ratios on the path max_ratio * u**s whose measure is closest to `level`, if inside [lo, hi]."""
        log_u = np.log(np.clip(u, 1e-12, 1.0 - 1e-12))  # u = 1 would pin a ratio at max_ratio for every s
        grid = _GRID
        for _ in range(_PASSES):
            ratios = self.max_ratio * np.exp(grid[:, None] * log_u[None, :])
            values = np.where(self.within_limits(ratios), self.measure(ratios), np.inf)  # over a limit: too far
            best = int(np.argmin(np.abs(values - level)))
            if lo <= values[best] <= hi and abs(values[best] - level) <= 0.05 * (hi - lo):
                return ratios[best]
            above = np.flatnonzero(values >= level)
            if len(above) == 0 or above[0] == 0:
                return ratios[best] if lo <= values[best] <= hi else None
            j = above[0]
            grid = np.linspace(grid[j - 1], grid[j], _REFINE_STEPS)
        return ratios[best] if lo <= values[best] <= hi else None
