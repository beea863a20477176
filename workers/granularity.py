"""Pruning granularities: what one ratio of a strategy removes, and how.

A granularity builds the strategy space of a model and proves it exact before anything expensive
(`prepare`: the preflight), rebuilds that space without the proof (`space`: for reloading a saved model), ranks
the units a ratio removes (`importance`), and builds the pruner that turns a strategy into a network
(`pruner`, with `.apply(ratios) -> nn.Module`). Each granularity is one module and one entry here:
channels (filters: a smaller dense network), unstructured weights (masks, dense shapes) and stripes (SP: each
k x k conv runs only its kept 1 x 1 stripes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import stripes, unstructured
from .preflight import preflight
from .prune import PrunePlan, position_importance
from .space import PruningSpace


@dataclass(frozen=True)
class Granularity:
    """What a strategy's ratios prune: its space builder (with preflight), its ranking and its pruner."""

    name: str
    prepare: Callable  # (model, example_inputs, num_classes, max_ratio, first, round_to, ignored) -> Verdict
    space: Callable  # (model, example_inputs, round_to, ignored) -> PruningSpace, without the preflight
    importance: Callable  # (model, space, criterion, seed) -> per group, the importance of each unit
    pruner: Callable  # (model, space, criterion, seed) -> an object with .apply(ratios) -> nn.Module
    comparable: bool  # importance compares across groups as it is (global magnitude), not per-group normalised


GRANULARITIES: dict[str, Granularity] = {
    "channel": Granularity("channel", preflight, PruningSpace.from_model, position_importance, PrunePlan, False),
    "unstructured": Granularity("unstructured", unstructured.preflight, unstructured.unstructured_space,
                                unstructured.weight_importance, unstructured.MaskPlan, True),
    "stripe": Granularity("stripe", stripes.preflight, stripes.stripe_space, stripes.stripe_importance,
                          stripes.StripePlan, False),
}
