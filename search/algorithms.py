"""Search algorithms: what strategy candidate i evaluates. Ray-free objects, driven by one Tune Searcher.

An algorithm proposes the strategy of a candidate number and observes finished candidates. Every algorithm
proposes points of the sampler's unit cube (a direction u in [0, 1]^G and a level v in the budget band), which
`StrategySampler.strategy` maps to a valid strategy, so every proposal is inside the budget. The Tune adapter
(`tune_search.StrategySearcher`) numbers the candidates and, on resume, replays every stored record through
`observe`; a proposal is a function of the seed, the candidate number and the records observed, so a serial
search (one trial at a time) continues after a resume exactly as it would have without the interruption.

- `random`: EagleEye's search; candidate i is the sampler's i-th draw, whatever the scores say.
- `evolution`: steady-state evolution (the way MetaPruning and ABCPruner search strategies): after `population`
  random draws, each candidate is a child of two parents picked by tournament among the best `population`
  observed: uniform crossover, Gaussian mutation, projected into the band.
- `tpe`: Optuna's multivariate TPE over the cube, after `population` random draws; candidates still in flight
  count as running trials (constant liar), so parallel trials do not all propose the same point.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from prunetune.workers.record import CandidateRecord, best

from .sampler import StrategySampler

_ATTEMPTS = 32  # proposals tried before falling back to a random draw (a point whose channel steps miss the band)


class SearchAlgorithm(Protocol):
    """Proposes strategies (one ratio per group, inside the budget) and learns from finished candidates."""

    def propose(self, index: int) -> list[float]:
        """The strategy candidate `index` evaluates."""

    def observe(self, record: CandidateRecord) -> None:
        """A finished candidate (successful or failed)."""


class RandomSearch:
    """EagleEye's random search: candidate i is the sampler's i-th valid draw (the same on every machine)."""

    def __init__(self, sampler: StrategySampler, population: int = 16):
        self.sampler = sampler  # population: random search has none

    def propose(self, index: int) -> list[float]:
        """The sampler's draw number `index`."""
        return self.sampler.sample(index)

    def observe(self, record: CandidateRecord) -> None:
        """Random search learns nothing."""


class _Learning:
    """What the learning algorithms share: the records observed, and the random start."""

    def __init__(self, sampler: StrategySampler, population: int = 16):
        self.sampler, self.population = sampler, population
        self.observed: dict[int, CandidateRecord] = {}
        self.proposed: dict[int, list[float]] = {}

    def observe(self, record: CandidateRecord) -> None:
        """Remember a finished candidate (the first record of each candidate counts)."""
        self.observed.setdefault(record.index, record)

    def propose(self, index: int) -> list[float]:
        """A random draw until `population` candidates have scores, then the algorithm's own proposal."""
        scored = [r for r in self.observed.values() if r.ok]
        ratios = None
        if len(scored) >= self.population:
            rng = np.random.default_rng([self.sampler.seed, int(index), 1])
            ratios = next((r for r in (self._point(scored, index, rng) for _ in range(_ATTEMPTS)) if r is not None),
                          None)
        ratios = self.sampler.sample(index) if ratios is None else [float(r) for r in ratios]
        self.proposed[index] = ratios
        return ratios

    def _point(self, scored: list[CandidateRecord], index: int, rng: np.random.Generator):
        raise NotImplementedError


class Evolution(_Learning):
    """Steady-state evolution in the unit cube: tournament selection, uniform crossover, Gaussian mutation."""

    tournament, mutation = 3, 0.15

    def _point(self, scored: list[CandidateRecord], index: int, rng: np.random.Generator):
        pool = best(scored, self.population)
        parents = [int(rng.choice(len(pool), self.tournament).min()) for _ in range(2)]  # the pool is best first
        (ua, va), (ub, vb) = (self.sampler.position(pool[p].ratios) for p in parents)
        take = rng.random(len(ua)) < 0.5
        u = np.clip(np.where(take, ua, ub) + rng.normal(0, self.mutation, len(ua)), 0.0, 1.0)
        v = float(np.clip((va if rng.random() < 0.5 else vb) + rng.normal(0, self.mutation), 0.0, 1.0))
        return self.sampler.strategy(u, v)


class TPE(_Learning):
    """Optuna's multivariate TPE over the unit cube, rebuilt from the observed records for every proposal."""

    def _point(self, scored: list[CandidateRecord], index: int, rng: np.random.Generator):
        import optuna
        from optuna.distributions import FloatDistribution
        from optuna.trial import TrialState, create_trial

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        groups = len(self.sampler.space.groups)
        space = {**{f"u{g}": FloatDistribution(0.0, 1.0) for g in range(groups)}, "v": FloatDistribution(0.0, 1.0)}

        def params(ratios) -> dict:
            u, v = self.sampler.position(ratios)
            return {**{f"u{g}": float(x) for g, x in enumerate(u)}, "v": v}

        pending = [r for i, r in sorted(self.proposed.items()) if i not in self.observed]
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
            seed=int(rng.integers(2 ** 31)), n_startup_trials=0, multivariate=True, constant_liar=True))
        study.add_trials([create_trial(params=params(r.ratios), distributions=space, value=r.score)
                          for r in sorted(scored, key=lambda r: r.index)] +
                         [create_trial(params=params(r), distributions=space, state=TrialState.RUNNING)
                          for r in pending])
        trial = study.ask(space)
        return self.sampler.strategy([trial.params[f"u{g}"] for g in range(groups)], trial.params["v"])


ALGORITHMS: dict[str, Callable[..., SearchAlgorithm]] = {"random": RandomSearch, "evolution": Evolution,
                                                         "tpe": TPE}
