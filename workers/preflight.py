"""The preflight: before anything expensive, prove that the space models what the pruner really does.

It prunes the model (its architecture; weights do not matter) with the most pruned strategy and the first
strategy the search will try, runs each pruned network forward, checks that the output width is the data's
class count, and compares the space's FLOPs and params with fvcore's count on the pruned network. Groups that
break any of these (found by pruning one group at a time), or that discovery could not model exactly, are left
out with a warning when they share one cause (one layer); with more causes the model is refused in one line that
names them and the `model.ignored_layers` that would skip them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .groups import SpaceError, describe_module, module_stack
from .prune import PrunePlan
from .space import PruningSpace, count_flops

_TOLERANCE = 1e-9  # relative, above one FLOP: the analytic count is exact up to float rounding


@dataclass
class Verdict:
    """What the preflight found: the space to search, the groups it left out, and what it checked."""

    space: PruningSpace
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (group, reason), left out with a warning
    checked: list[tuple[str, int, int]] = field(default_factory=list)  # (strategy, FLOPs, params), all exact
    counted_by: str = "fvcore's count"  # what the space's figures were checked against

    def describe(self) -> str:
        """Lines for `prunetune inspect`: what was checked, and what was left out."""
        lines = [f"preflight: {name}: FLOPs {flops:,} and params {params:,} equal {self.counted_by} on the pruned "
                 "network; it runs and has the right output width" for name, flops, params in self.checked]
        lines += [f"preflight: warning: left the group of {name} out ({reason})" for name, reason in self.left_out]
        return "\n".join(lines)


def output_width(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Width of the model's output (its class count), from one forward pass in eval mode."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example_inputs)
    except Exception as e:
        raise SpaceError(f"model: the forward pass fails on an input of shape {tuple(example_inputs.shape)} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise SpaceError(f"model: the forward pass must return logits of shape [batch, classes], got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return int(out.shape[1])


def check_width(model: nn.Module, example_inputs: torch.Tensor, num_classes: int) -> int:
    """The model's output width, which must be the data's class count (SpaceError naming both if not)."""
    width = output_width(model, example_inputs)
    if width != num_classes:
        raise SpaceError(f"model: the model returns {width} outputs but the data has {num_classes} classes; give "
                         "the factory a num_classes argument (or set it in model.kwargs)")
    return width


def strategies_to_prove(space: PruningSpace, max_ratio: float, first: Callable[[PruningSpace], list[float]]
                        ) -> dict[str, np.ndarray]:
    """The strategies every preflight proves: the most pruned one, and the first the search will evaluate."""
    return {"most pruned": np.full(len(space.groups), max_ratio), "first sampled": np.array(first(space))}


def within_tolerance(predicted: float, counted: float) -> bool:
    """True if the space's figure equals a direct count (exact up to float rounding, at most one FLOP)."""
    return abs(predicted - counted) <= max(1.0, _TOLERANCE * counted)


def _problem(model: nn.Module, plan: PrunePlan, ratios, example_inputs: torch.Tensor, width: int) -> str | None:
    """Why the network pruned by `ratios` is not what the space says, or None if it is."""
    pruned = plan.apply(ratios).eval()
    with module_stack(pruned) as stack:
        try:
            with torch.no_grad():
                out = pruned(example_inputs)
        except Exception as e:
            where = describe_module(pruned, stack[-1]) if stack else "the model"
            return f"the pruned network fails in {where}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if out.shape[-1] != width:
        return f"the pruned network returns {out.shape[-1]} outputs, not {width}"
    space = plan.space
    flops, params = int(count_flops(pruned, example_inputs).total()), sum(p.numel() for p in pruned.parameters())
    for what, model_value, real in (("FLOPs", space.flops(ratios), flops), ("params", space.params(ratios), params)):
        if not within_tolerance(model_value, real):
            return f"{what} {model_value:,} by the space, {real:,} by fvcore on the pruned network"
    return None


def _check(model: nn.Module, space: PruningSpace, example_inputs: torch.Tensor, width: int,
           strategies: dict[str, np.ndarray]) -> tuple[list[tuple[str, str]], list[tuple[str, int, int]]]:
    """(culprit groups, checked strategies): groups that break a strategy, each found by pruning it alone."""
    plan = PrunePlan(model, space, order=[np.arange(g.units // g.blocks) for g in space.groups])
    failures = {name: _problem(model, plan, r, example_inputs, width) for name, r in strategies.items()}
    if not any(failures.values()):
        return [], [(name, space.flops(r), space.params(r)) for name, r in strategies.items()]
    extreme = next(iter(strategies.values()))
    culprits = []
    for gi, g in enumerate(space.groups):
        alone = np.zeros(len(space.groups))
        alone[gi] = extreme[gi]
        problem = _problem(model, plan, alone, example_inputs, width)
        if problem:
            culprits.append((g.name, problem))
    if not culprits:
        name, problem = next((n, p) for n, p in failures.items() if p)
        raise SpaceError(f"model: the {name} strategy is not modelled exactly ({problem}), although every group "
                         "alone is; prunetune cannot prune this model")
    return culprits, []


def preflight(model: nn.Module, example_inputs: torch.Tensor, num_classes: int, max_ratio: float,
              first: Callable[[PruningSpace], list[float]], round_to: int = 1,
              ignored_layers: list[str] | None = None) -> Verdict:
    """Build the channel space of `model` and prove it exact on the extreme and the first strategy (SpaceError if
    not).

    `first(space)` is the first strategy the search will evaluate in that space.
    """
    width = check_width(model, example_inputs, num_classes)
    ignored, left_out = list(ignored_layers or []), []
    while True:  # at most twice: once more after leaving out the groups of a single cause
        space = PruningSpace.from_model(model, example_inputs, round_to, ignored)
        found = space.rejected  # groups discovery could not model: no strategy needed to know
        if not found:
            found, checked = _check(model, space, example_inputs, width, strategies_to_prove(space, max_ratio, first))
            if not found:
                return Verdict(space, left_out, checked)
        causes = list(dict.fromkeys(reason for _, reason in left_out + found))
        if left_out or len(causes) > 1:
            names = list(dict.fromkeys(name for name, _ in left_out + found))
            more = f"; and {len(causes) - 2} more" if len(causes) > 2 else ""
            raise SpaceError(f"model: {len(names)} channel groups cannot be pruned exactly ({'; '.join(causes[:2])}"
                             f"{more}); to prune the rest, set model.ignored_layers=[{','.join(ignored + names)}]")
        left_out = found
        ignored += [name for name, _ in found]
