"""Search algorithms: what strategy candidate i evaluates. Ray-free objects, driven by one Tune Searcher.

An algorithm proposes the strategy of a candidate number and observes finished candidates. The Tune adapter
(`tune_search.StrategySearcher`) numbers the candidates, stores nothing itself, and on resume replays every
stored record through `observe` in candidate order, so an algorithm's state is a function of the results
store. `random` is EagleEye's search: candidate i is the sampler's i-th draw, whatever the scores say.
"""
from __future__ import annotations

from typing import Callable, Protocol

from prunetune.workers.record import CandidateRecord

from .sampler import StrategySampler


class SearchAlgorithm(Protocol):
    """Proposes strategies (one ratio per group, inside the budget) and learns from finished candidates."""

    def propose(self, index: int) -> list[float]:
        """The strategy candidate `index` evaluates."""

    def observe(self, record: CandidateRecord) -> None:
        """A finished candidate (successful or failed)."""


class RandomSearch:
    """EagleEye's random search: candidate i is the sampler's i-th valid draw (the same on every machine)."""

    def __init__(self, sampler: StrategySampler):
        self.sampler = sampler

    def propose(self, index: int) -> list[float]:
        """The sampler's draw number `index`."""
        return self.sampler.sample(index)

    def observe(self, record: CandidateRecord) -> None:
        """Random search learns nothing."""


ALGORITHMS: dict[str, Callable[[StrategySampler], SearchAlgorithm]] = {"random": RandomSearch}
