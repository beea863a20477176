"""The pruning methods, by the name `search.granularity` gives: one module each, one line each here.

Every method implements `protocol.PruningMethod`; the driver never names one. A new method is a module with a
`METHOD` object and a line in METHODS (see "Adding a pruning method" in docs/concepts/architecture.md).
"""
from __future__ import annotations

from . import channel, stripe, unstructured
from .protocol import PruningMethod, misuse

METHODS: dict[str, PruningMethod] = {
    channel.METHOD.name: channel.METHOD,
    unstructured.METHOD.name: unstructured.METHOD,
    stripe.METHOD.name: stripe.METHOD,
}

__all__ = ["METHODS", "PruningMethod", "misuse"]
