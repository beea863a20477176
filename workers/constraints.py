"""Budgets a strategy must meet: one entry per measurable quantity, and how a budget is written.

A constraint measures a batch of kept-channel counts ([S, G] -> [S]) and the unpruned network. The sampler
walks each strategy to a level of the configured constraint (`search.constraint`, target +- tolerance) and
keeps it under every other budget (`search.limits`). Latency is predicted by the space's latency table
(`latency.py`), which the driver attaches before the search when a budget names latency.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .groups import SpaceError
from .messages import shown
from .space import PruningSpace

UNITS = {"flops": "FLOPs", "params": "parameters", "latency": "ms"}
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


@dataclass(frozen=True)
class Constraint:
    """One measurable quantity of a pruned network."""

    name: str
    of_kept: Callable[[PruningSpace, np.ndarray], np.ndarray]  # [S, G] kept counts -> [S] values
    base: Callable[[PruningSpace], float]  # the unpruned network's value

    def fraction(self, space: PruningSpace, kept: np.ndarray) -> np.ndarray:
        """Values of a [S, G] batch of kept counts as fractions of the unpruned network."""
        return self.of_kept(space, kept) / self.base(space)


def _latency_table(space: PruningSpace):
    if space.latency is None:
        raise SpaceError("search: a latency budget needs the space's latency table (prunetune builds it before the "
                         "search; see `prunetune inspect --latency`)")
    return space.latency


def _full(space: PruningSpace) -> np.ndarray:
    return space.kept_batch(np.zeros((1, len(space.groups))))


CONSTRAINTS: dict[str, Constraint] = {
    "flops": Constraint("flops", PruningSpace.flops_of_kept, lambda space: space.base_flops),
    "params": Constraint("params", PruningSpace.params_of_kept, lambda space: space.base_params),
    "latency": Constraint("latency", lambda space, kept: _latency_table(space).predict(space, kept),
                          lambda space: float(_latency_table(space).predict(space, _full(space))[0])),
}


@dataclass(frozen=True)
class Budget:
    """An upper bound on one constraint: a fraction of the unpruned network, or an absolute value in its unit."""

    name: str
    value: float
    absolute: bool

    def fraction(self, space: PruningSpace) -> float:
        """The bound as a fraction of the unpruned network of `space`."""
        return self.value / CONSTRAINTS[self.name].base(space) if self.absolute else self.value


def parse_budget(key: str, name: str, value) -> Budget:
    """A budget from what a user wrote: 0.6 or '60%' (of the base), '12ms' (latency), 2.1e9 or '2.1G' (FLOPs,
    params); a ConfigError-style ValueError naming `key` otherwise."""
    allowed = "a fraction in (0, 1), a percentage ('60%'), " + \
        ("milliseconds ('12ms')" if name == "latency" else "or a count (2.1e9, '2.1G', '300k')")
    if name not in CONSTRAINTS:
        raise ValueError(f"{key}: unknown budget '{name}'; allowed: {', '.join(CONSTRAINTS)}")
    text = str(value).strip().lower().replace(" ", "")
    if isinstance(value, bool):
        raise ValueError(f"{key}: {shown(value)} is not a budget; expected {allowed}")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)(%|ms|k|m|g|t)?", text)
    if not match:
        raise ValueError(f"{key}: {shown(value)} is not a budget; expected {allowed}")
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        number, unit = number / 100, None
    if unit is None and 0 < number < 1:
        return Budget(name, number, absolute=False)
    if name == "latency" and unit == "ms" and number > 0:
        return Budget(name, number, absolute=True)
    if name != "latency" and unit != "ms" and number >= 1:
        return Budget(name, number * _SUFFIX.get(unit, 1.0), absolute=True)
    raise ValueError(f"{key}: {shown(value)} is not a budget; expected {allowed}")
