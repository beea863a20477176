"""Search algorithms: what strategy candidate i evaluates. Ray-free objects, driven by one Tune Searcher.

An algorithm proposes the strategy of a candidate number and observes finished candidates. Every algorithm
proposes points of the sampler's unit cube (a direction u in [0, 1]^G and a level v in the budget band), which
`StrategySampler.strategy` maps to a valid strategy, so every proposal is inside the budget. The Tune adapter
(`tune_search.StrategySearcher`) hands candidates out in batches of `search.batch_size` consecutive numbers and,
on resume, replays every stored record through `observe`. A proposal is a function of the seed, the candidate
number, its batch's first number (the horizon) and the records before the horizon (the candidates from the
horizon on are in flight), so a serial search (one trial at a time) continues after a resume exactly as it would
have without the interruption.

- `random`: EagleEye's search; candidate i is the sampler's i-th draw, whatever the scores say.
- `evolution`: steady-state evolution (the way MetaPruning and ABCPruner search strategies): after `population`
  random draws, each candidate is a child of two parents picked by tournament among the best `population`
  observed: uniform crossover, Gaussian mutation, projected into the band.
- `tpe`: Optuna's multivariate TPE over the cube, after `population` random draws; candidates still in flight
  count as running trials (constant liar), so parallel trials do not all propose the same point.

With a front (several budgets) a learning algorithm improves each budget apart: candidate i is proposed in budget
i mod n (`StrategySampler.within`), from that budget's records alone, so a higher budget's higher scores do not
draw every proposal to it. With one budget this is the search it always was.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from prunetune.workers.record import CandidateRecord, best

from .sampler import StrategySampler

_ATTEMPTS = 32  # proposals tried before falling back to a random draw (a point whose channel steps miss the band)


class SearchAlgorithm(Protocol):
    """Proposes strategies (one ratio per group, inside the budget) and learns from finished candidates."""

    def propose(self, index: int, horizon: int | None = None) -> list[float]:
        """The strategy candidate `index` evaluates, learnt from the records before `horizon` (default: index)."""

    def observe(self, record: CandidateRecord) -> None:
        """A finished candidate (successful or failed)."""


class RandomSearch:
    """EagleEye's random search: candidate i is the sampler's i-th valid draw (the same on every machine)."""

    def __init__(self, sampler: StrategySampler, population: int = 16):
        self.sampler = sampler  # population: random search has none

    def propose(self, index: int, horizon: int | None = None) -> list[float]:
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

    def budget(self, ratios) -> int:
        """The budget (of a front) a strategy is in; 0 with one budget."""
        if len(self.sampler.bands) == 1 or not len(ratios):
            return 0
        return int(self.sampler.budget_of(np.asarray(ratios, dtype=np.float64)[None])[0])

    def propose(self, index: int, horizon: int | None = None) -> list[float]:
        """A random draw until `population` candidates of its budget before the horizon have scores, then the
        algorithm's own proposal from those."""
        horizon = index if horizon is None else horizon
        budget = index % len(self.sampler.bands)
        sampler = self.sampler.within(budget)
        scored = [r for r in self.observed.values() if r.ok and r.index < horizon and self.budget(r.ratios) == budget]
        ratios = None
        if len(scored) >= self.population:
            rng = np.random.default_rng([self.sampler.seed, int(index), 1])
            ratios = next((r for r in (self._point(scored, index, horizon, rng, sampler) for _ in range(_ATTEMPTS))
                           if r is not None), None)
        ratios = sampler.sample(index) if ratios is None else [float(r) for r in ratios]
        self.proposed[index] = ratios
        return ratios

    def in_flight(self, index: int, horizon: int) -> dict[int, list[float]]:
        """The strategies of the candidates in flight when candidate `index` is proposed, by number: those of its
        batch before it (from the horizon on, finished or not), and earlier ones proposed but not observed; of its
        own budget."""
        known = {**{i: r.ratios for i, r in self.observed.items()}, **self.proposed}
        budget = index % len(self.sampler.bands)
        return {i: known[i] for i in sorted(known) if i < index and (i >= horizon or i not in self.observed)
                and self.budget(known[i]) == budget}

    def _point(self, scored: list[CandidateRecord], index: int, horizon: int, rng: np.random.Generator,
               sampler: StrategySampler):
        raise NotImplementedError


class Evolution(_Learning):
    """Steady-state evolution in the unit cube: tournament selection, uniform crossover, Gaussian mutation."""

    tournament, mutation = 3, 0.15

    def _point(self, scored: list[CandidateRecord], index: int, horizon: int, rng: np.random.Generator,
               sampler: StrategySampler):
        pool = best(scored, self.population)
        parents = [int(rng.choice(len(pool), self.tournament).min()) for _ in range(2)]  # the pool is best first
        (ua, va), (ub, vb) = (sampler.position(pool[p].ratios) for p in parents)
        take = rng.random(len(ua)) < 0.5
        u = np.clip(np.where(take, ua, ub) + rng.normal(0, self.mutation, len(ua)), 0.0, 1.0)
        v = float(np.clip((va if rng.random() < 0.5 else vb) + rng.normal(0, self.mutation), 0.0, 1.0))
        return sampler.strategy(u, v)


class TPE(_Learning):
    """Optuna's multivariate TPE over the unit cube, fitted to a bounded window of the observed records.

    The window is the `window_best` best records and the `window_recent` most recent others (all of them in a search
    of up to window_best + window_recent candidates), so a proposal costs the same at 300 or 5,000 records. The
    study is built once per batch (per horizon, and per budget of a front) and reused for the batch's proposals;
    candidates in flight are running trials at their strategies' positions (constant liar), and each proposal
    re-seeds the sampler from its own number, so the study a proposal sees, and the proposal, do not depend on how
    the batch was reached."""

    window_best, window_recent = 64, 192

    def __init__(self, sampler: StrategySampler, population: int = 16):
        super().__init__(sampler, population)
        self._studies: dict[int, tuple[int, object, set]] = {}  # per budget: its horizon, study, indices lying in it

    def _window(self, scored: list[CandidateRecord]) -> list[CandidateRecord]:
        """The records the study is fitted to, in candidate order."""
        top = best(scored, self.window_best)
        chosen = {r.index for r in top}
        recent = sorted((r for r in scored if r.index not in chosen), key=lambda r: r.index)[-self.window_recent:]
        return sorted(top + recent, key=lambda r: r.index)

    def _point(self, scored: list[CandidateRecord], index: int, horizon: int, rng: np.random.Generator,
               sampler: StrategySampler):
        import optuna
        from optuna.distributions import FloatDistribution
        from optuna.trial import TrialState, create_trial

        groups = len(sampler.space.groups)
        space = {**{f"u{g}": FloatDistribution(0.0, 1.0) for g in range(groups)}, "v": FloatDistribution(0.0, 1.0)}

        def params(ratios) -> dict:
            u, v = sampler.position(ratios)
            return {**{f"u{g}": float(x) for g, x in enumerate(u)}, "v": v}

        budget = index % len(self.sampler.bands)
        if budget not in self._studies or self._studies[budget][0] != horizon:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.create_study(direction="maximize")
            study.add_trials([create_trial(params=params(r.ratios), distributions=space, value=r.score)
                              for r in self._window(scored)])
            self._studies[budget] = (horizon, study, set())
        _, study, lying = self._studies[budget]
        new = {i: r for i, r in self.in_flight(index, horizon).items() if i not in lying}
        study.add_trials([create_trial(params=params(r), distributions=space, state=TrialState.RUNNING)
                          for r in new.values()])
        lying |= set(new)
        study.sampler = optuna.samplers.TPESampler(seed=int(rng.integers(2 ** 31)), n_startup_trials=0,
                                                   multivariate=True, constant_liar=True)
        trial = study.ask(space)
        study.tell(trial, state=TrialState.FAIL)  # ignored by TPE; its strategy lies as a running trial next
        return sampler.strategy([trial.params[f"u{g}"] for g in range(groups)], trial.params["v"])


ALGORITHMS: dict[str, Callable[..., SearchAlgorithm]] = {"random": RandomSearch, "evolution": Evolution,
                                                         "tpe": TPE}
