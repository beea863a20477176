"""A toy pruning method, added through the registry alone (tests/test_method_registry.py; the docs show it):
channel pruning that never prunes the stem, the model's first conv."""
from __future__ import annotations

from dataclasses import replace

import torch.nn as nn

from prunetune.workers.methods.protocol import as_deployed, as_stored, plain_state
from prunetune.workers.preflight import PreflightOptions, preflight
from prunetune.workers.prune import PrunePlan, position_importance
from prunetune.workers.space import PruningSpace


def _with_stem(model: nn.Module, ignored: list[str] | None) -> list[str]:
    stem = next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
    return [*(ignored or []), stem]


# --8<-- [start:method] (docs/concepts/architecture.md shows this class)
class KeepStem:
    """Channel pruning with the first conv's channels left whole."""

    name, title, units = "keep-stem", "stem-preserving channel pruning", "channels"
    criteria = ("l1", "l2")
    comparable, latency, round_to, sparsity, report_note = False, False, True, None, None
    importance, plan = staticmethod(position_importance), staticmethod(PrunePlan)
    deployable, pack, unpack = staticmethod(as_deployed), staticmethod(plain_state), staticmethod(as_stored)

    def space(self, model, example_inputs, round_to=1, ignored_layers=None) -> PruningSpace:
        return PruningSpace.from_model(model, example_inputs, round_to, _with_stem(model, ignored_layers))

    def preflight(self, model, example_inputs, options: PreflightOptions):
        return preflight(model, example_inputs,
                         replace(options, ignored_layers=_with_stem(model, list(options.ignored_layers))))
# --8<-- [end:method]
