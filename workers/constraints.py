"""Budgets a strategy must meet, as fractions of the unpruned network: one entry per measurable quantity.

A constraint measures a batch of kept-channel counts ([S, G] -> [S]) and the unpruned network. The sampler
walks each strategy to a level of the configured constraint (`search.constraint`); a new budget (latency from
a look-up table, say) is one more entry in CONSTRAINTS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .space import PruningSpace


@dataclass(frozen=True)
class Constraint:
    """One measurable quantity of a pruned network."""

    name: str
    of_kept: Callable[[PruningSpace, np.ndarray], np.ndarray]  # [S, G] kept counts -> [S] values
    base: Callable[[PruningSpace], float]  # the unpruned network's value

    def fraction(self, space: PruningSpace, kept: np.ndarray) -> np.ndarray:
        """Values of a [S, G] batch of kept counts as fractions of the unpruned network."""
        return self.of_kept(space, kept) / self.base(space)


CONSTRAINTS: dict[str, Constraint] = {
    "flops": Constraint("flops", PruningSpace.flops_of_kept, lambda space: space.base_flops),
    "params": Constraint("params", PruningSpace.params_of_kept, lambda space: space.base_params),
}
