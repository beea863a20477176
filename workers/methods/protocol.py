"""What a pruning method is: the one protocol every method module implements (channel, unstructured, stripe).

A method says what one ratio of a strategy removes. The driver only ever talks to a method through this
protocol, by the name in `search.granularity`: it asks it to build and prove its space (`preflight`), to rank
the units (`importance`), to turn strategies into networks (`plan`), to make a fine-tuned network deployable,
and to pack its weights into a model file. What a method cannot be combined with is data (`criteria`,
`latency`, `round_to`, `sparsity`), checked in one place (`methods.misuse`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn as nn

from ..criteria import BATCHNORM, CRITERIA
from ..data import DataBundle
from ..finetune import FinetuneOptions
from ..preflight import PreflightOptions, Verdict
from ..settings import FinetuneSettings
from ..space import PruningSpace


class Plan(Protocol):
    """Everything about pruning one base model that does not depend on the strategy, built once per worker."""

    def apply(self, ratios) -> nn.Module:
        """A new network: the base model pruned by `ratios` (one per group of the space)."""


class SparsityTrainer(Protocol):
    """Trains `model` in place with an L1 penalty of `strength` on the method's scales (sparsity.slimming_train)."""

    def __call__(self, model: nn.Module, data: DataBundle, settings: FinetuneSettings, strength: float,
                 options: FinetuneOptions | None = None) -> None:
        ...


@dataclass(frozen=True)
class SparsityTraining:
    """A method's sparsity training before the search (`model.sparsity`): an L1 penalty on one scale per unit."""

    name: str  # e.g. Network Slimming
    values: str  # what the penalty makes sparse, as the report names it (|gamma|, stripe L1 norm)
    measure: Callable[[nn.Module], np.ndarray]  # those values of a model
    train: SparsityTrainer  # trains a model in place
    needs_batchnorm: bool = False  # refused up front for a model without an affine BatchNorm
    criterion: str | None = None  # the criterion that reads what it trains (a warning if another is chosen)


class PruningMethod(Protocol):
    """One way of pruning: its space, proof, ranking, pruner, deployable form and file format."""

    name: str  # the value of search.granularity
    title: str  # how messages name it ("unstructured pruning")
    units: str  # what a group's units are, plural ("channels", "single weights", "stripes")
    criteria: tuple[str, ...]  # the search.criterion values it ranks units with
    comparable: bool  # importance compares across groups as it is (global magnitude), not per-group normalised
    latency: bool  # its networks can be timed by the latency table (dense layers of fewer channels)
    round_to: bool  # search.round_to applies (channel counts)
    sparsity: SparsityTraining | None
    report_note: str | None  # a paragraph the report adds for runs of this method

    def space(self, model: nn.Module, example_inputs: torch.Tensor, round_to: int = 1,
              ignored_layers: list[str] | None = None) -> PruningSpace:
        """The method's space for `model`, without the proof (rebuilding a saved model's architecture)."""

    def preflight(self, model: nn.Module, example_inputs: torch.Tensor, options: PreflightOptions) -> Verdict:
        """Build the space and prove it exact on the most pruned and the first strategy (SpaceError if not)."""

    def importance(self, model: nn.Module, space: PruningSpace, criterion: str = "l1", seed: int = 0
                   ) -> list[np.ndarray]:
        """Per group, the importance of each unit (higher = keep)."""

    def plan(self, model: nn.Module, space: PruningSpace, criterion: str = "l1", seed: int = 0) -> Plan:
        """The pruner of `model` in `space`, with its units ranked by `criterion`."""

    def deployable(self, model: nn.Module) -> nn.Module:
        """The pruned network as it is deployed (e.g. masks made permanent); may change `model` in place."""

    def pack(self, model: nn.Module) -> dict:
        """The state dict a model file stores (e.g. masked weights as bit masks plus their non-zero values)."""

    def unpack(self, state: dict) -> dict:
        """The state dict of the pruned network from what `pack` stored."""


def plain_state(model: nn.Module) -> dict:
    """`pack` of a method whose pruned networks are plain dense modules: the state dict, on the CPU."""
    return {k: v.cpu() for k, v in model.state_dict().items()}


def as_stored(state: dict) -> dict:
    """`unpack` of a method whose `pack` is `plain_state`."""
    return state


def as_deployed(model: nn.Module) -> nn.Module:
    """`deployable` of a method whose pruned networks are deployed as they are."""
    return model


def _alternatives(criteria: tuple[str, ...]) -> str:
    names = [f"{c} (magnitude)" if c == "l1" else c for c in criteria]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def criterion_misuse(method: PruningMethod, criterion: str) -> str | None:
    """Why `criterion` cannot rank the method's units (None if it can)."""
    if criterion in method.criteria:
        return None
    reads = "channels by BatchNorm scales" if CRITERIA[criterion].source == BATCHNORM else "other units"
    return (f"search.criterion: {criterion} ranks {reads}; {method.title} ranks {method.units}: use "
            f"{_alternatives(method.criteria)}")


def misuse(method: PruningMethod, criterion: str, latency: bool, round_to: int, sparsity: bool,
           methods: dict) -> str | None:
    """The first setting the method cannot be combined with, as a one-line error (None if all fit): its
    criterion, a latency budget, channel rounding, sparsity training (`methods`: the registry, to name one that has
    it)."""
    if criterion_misuse(method, criterion):
        return criterion_misuse(method, criterion)
    if latency and not method.latency:
        return (f"search.constraint: latency budgets need channel pruning: the latency table times dense layers by "
                f"their channel counts, and {method.title} keeps {method.units} (use flops or params)")
    if round_to != 1 and not method.round_to:
        return f"search.round_to: rounds channel counts; {method.title} keeps {method.units} (leave it at 1)"
    if sparsity and method.sparsity is None:
        other = next(m for m in methods.values() if m.sparsity is not None)
        return (f"model.sparsity: {other.sparsity.name} prunes {other.units}; use it with search.granularity: "
                f"{other.name}")
    return None
