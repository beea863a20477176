"""Pruning granularities: what one ratio of a strategy removes, and how.

A granularity builds the strategy space of a model and proves it exact before anything expensive
(`prepare`: the preflight), and builds the pruner that turns a strategy into a smaller network (`pruner`, with
`.apply(ratios) -> nn.Module`). Channels (filters) are the only one today; unstructured weights or stripes
would each be one module and one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .preflight import preflight
from .prune import PrunePlan


@dataclass(frozen=True)
class Granularity:
    """What a strategy's ratios prune: its space builder (with preflight) and its pruner."""

    name: str
    prepare: Callable  # (model, example_inputs, num_classes, max_ratio, first, round_to, ignored) -> Verdict
    pruner: Callable  # (model, space, criterion, seed) -> an object with .apply(ratios) -> nn.Module


GRANULARITIES: dict[str, Granularity] = {
    "channel": Granularity("channel", preflight, PrunePlan),
}
