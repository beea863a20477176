"""The preflight: before anything expensive, prove that the space models what the pruner really does.

It prunes the model (its architecture, on a copy whose constant parameters are perturbed so no channel is silent)
with the most pruned strategy, the first strategy the search will try, and the least pruned one (one step from
every group: a count the graph does not show, such as a functional group_norm's or a channel shuffle's group
count, fails there), runs each pruned network forward, checks that the output width is the data's class count,
compares the space's FLOPs and params with fvcore's count on the pruned network, and checks its function: on a
random input it must compute what the base computes with the removed channels zeroed at the input of every conv
and linear layer (cross-channel statistics of layer_norm, group_norm and rms_norm, which legitimately change with
the channel count, are reduced to their affine part in both). That catches a pruned network that keeps the wrong
channels, as after a channel permutation (torch.roll, flip, an index) that Torch-Pruning maps channel i to i
through. Groups that break any of these (found by pruning one group at a time), or that discovery could not model
exactly, are left out with a warning when they share one cause (one layer); with more causes the model is refused
in one line that names them and the `model.ignored_layers` that would skip them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .groups import IN, SpaceError, describe_module, error_line, module_stack, refuse_compiled
from .progress import Steps
from .prune import PrunePlan, clone_module
from .space import PruningSpace, count_flops
from .tasks import CLASSIFICATION, Task, output_tensors

_TOLERANCE = 1e-9  # relative, above one FLOP: the analytic count is exact up to float rounding
# Relative to the output's largest magnitude: float32 rounding stays near 1e-6 there, a wrong channel is ~1e-2.
FUNCTIONAL_TOLERANCE = 1e-4


@dataclass
class Verdict:
    """What the preflight found: the space to search, the groups it left out, and what it checked."""

    space: PruningSpace
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (group, reason), left out with a warning
    checked: list[tuple[str, int, int]] = field(default_factory=list)  # (strategy, FLOPs, params), all exact
    counted_by: str = "fvcore's count"  # what the space's figures were checked against
    functional: bool = False  # whether the pruned networks' function was checked too

    def describe(self) -> str:
        """Lines for `prunetune inspect`: what was checked, and what was left out."""
        lines = [f"preflight: {name}: FLOPs {flops:,} and params {params:,} equal {self.counted_by} on the pruned "
                 f"network; {self._what_holds()}" for name, flops, params in self.checked]
        lines += [f"preflight: warning: left the group of {name} out ({reason})" for name, reason in self.left_out]
        return "\n".join(lines)

    def _what_holds(self) -> str:
        if self.functional:
            return ("it runs, has the right output width and computes what the base computes without the removed "
                    "channels")
        return "it runs and has the right output width"


def prediction_shape(model: nn.Module, example_inputs: torch.Tensor, task: Task = CLASSIFICATION
                     ) -> tuple[int, ...] | list[tuple[int, ...]]:
    """Shape of the model's prediction (the output `task` selects; of each tensor where it is a list), from one
    forward pass in eval mode."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example_inputs)
    except Exception as e:
        raise SpaceError(f"model: the forward pass fails on an input of shape {tuple(example_inputs.shape)} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    finally:
        model.train(was_training)
    try:
        prediction = task.select(out)
    except Exception as e:
        raise SpaceError(f"model: task {task.name} finds no prediction in the forward pass's output "
                         f"({type(out).__name__}: {error_line(e)})") from None
    if isinstance(prediction, list) and prediction and all(isinstance(p, torch.Tensor) for p in prediction):
        return [tuple(p.shape) for p in prediction]
    if not isinstance(prediction, torch.Tensor):
        raise SpaceError(f"model: task {task.name} finds no prediction tensor in the forward pass's output "
                         f"({type(out).__name__}; it selects {type(prediction).__name__})")
    return tuple(prediction.shape)


def check_output(model: nn.Module, example_inputs: torch.Tensor, num_classes: int, task: Task = CLASSIFICATION
                 ) -> tuple[int, ...] | list[tuple[int, ...]]:
    """The shape of the model's prediction, which must fit the task and the data's class count (SpaceError saying
    what the task expects if not)."""
    shape = prediction_shape(model, example_inputs, task)
    meta = [torch.empty(s, device="meta") for s in shape] if isinstance(shape, list) else \
        torch.empty(shape, device="meta")
    problem = task.check(meta, num_classes)
    if problem:
        raise SpaceError(f"model: {problem}")
    return shape


def output_shapes(model: nn.Module, example_inputs: torch.Tensor) -> list[tuple[int, ...]]:
    """The shapes of every tensor the model returns (its prediction, aux outputs, ...), in eval mode."""
    was_training = model.training
    try:
        with torch.no_grad():
            return [tuple(t.shape) for t in output_tensors(model.eval()(example_inputs))]
    finally:
        model.train(was_training)


def strategies_to_prove(space: PruningSpace, max_ratio: float, first: Callable[[PruningSpace], Sequence[float]]
                        ) -> dict[str, np.ndarray]:
    """The strategies every preflight proves: the most pruned one, and the first the search will evaluate."""
    return {"most pruned": np.full(len(space.groups), max_ratio), "first sampled": np.array(first(space))}


def within_tolerance(predicted: float, counted: float) -> bool:
    """True if the space's figure equals a direct count (exact up to float rounding, at most one FLOP)."""
    return abs(predicted - counted) <= max(1.0, _TOLERANCE * counted)


@contextlib.contextmanager
def _without_statistics() -> Iterator[None]:
    """layer_norm, group_norm and rms_norm reduced to their affine part (their statistics span the channels, so
    they change with the channel count however right the pruning is); every other op as it is."""
    from torch.overrides import TorchFunctionMode

    normalisations = {F.layer_norm: True, F.group_norm: True}  # -> whether it takes a bias
    if hasattr(F, "rms_norm"):
        normalisations[F.rms_norm] = False

    class Affine(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func not in normalisations:
                return func(*args, **kwargs)
            x = args[0]
            weight = kwargs.get("weight", args[2] if len(args) > 2 else None)
            bias = kwargs.get("bias", args[3] if len(args) > 3 else None) if normalisations[func] else None
            shape = (-1,) + (1,) * (x.dim() - 2) if func is F.group_norm else None  # the others: trailing dims
            x = x * (weight if shape is None else weight.view(shape)) if weight is not None else x
            return x + (bias if shape is None else bias.view(shape)) if bias is not None else x

    with Affine():
        yield


@contextlib.contextmanager
def _inputs_zeroed(plan: PrunePlan, keep: dict[tuple[str, str], np.ndarray]) -> Iterator[None]:
    """Zero, at the input of every conv and linear layer of the plan's model, the channels `keep` removes there."""
    hooks = []
    for (name, role), kept in keep.items():
        dim = plan.dims[(name, role)]
        if role != IN or dim.layer is None:
            continue
        mask = torch.zeros(dim.size)
        mask[torch.from_numpy(kept)] = 1.0

        def zero(module, args, mask=mask, last=dim.layer.name == "linear"):
            x = args[0]
            mask = mask.to(x)
            return (x * (mask if last else mask.view((-1,) + (1,) * (x.dim() - 2))),) + tuple(args[1:])

        hooks.append(plan.modules[name].register_forward_pre_hook(zero))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def functional_gap(plan: PrunePlan, ratios, pruned: nn.Module, inputs: torch.Tensor) -> float:
    """Largest difference between the pruned network's output and the base's with the removed channels zeroed at
    every conv and linear input, relative to the largest output (0 where the base's output is not finite)."""
    with torch.no_grad(), _without_statistics():
        got = output_tensors(pruned.eval()(inputs))
        with _inputs_zeroed(plan, plan.keep_indices(ratios)):
            want = output_tensors(plan.model.eval()(inputs))
    if not all(torch.isfinite(w).all() for w in want):
        return 0.0
    return max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) for g, w in zip(got, want))


def probe_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of `model` in eval mode whose constant parameters (a BatchNorm's ones and zeros, a zero-initialised
    scale) get small random offsets, so that no channel is silent and every channel differs."""
    probe = clone_module(model, {}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in probe.parameters():
            if p.is_floating_point() and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
    return probe


def _problem(plan: PrunePlan, ratios, example_inputs: torch.Tensor, inputs: torch.Tensor,
             shapes: list[tuple[int, ...]]) -> str | None:
    """Why the network pruned by `ratios` is not what the space says, or None if it is."""
    pruned = plan.apply(ratios).eval()
    with module_stack(pruned) as stack:
        try:
            with torch.no_grad():
                out = pruned(example_inputs)
        except Exception as e:
            where = describe_module(pruned, stack[-1]) if stack else "the model"
            return f"the pruned network fails in {where}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    got = [tuple(t.shape) for t in output_tensors(out)]
    if got != shapes:
        return f"the pruned network returns outputs of shape {got}, not {shapes}"
    space = plan.space
    flops, params = int(count_flops(pruned, example_inputs).total()), sum(p.numel() for p in pruned.parameters())
    for what, model_value, real in (("FLOPs", space.flops(ratios), flops), ("params", space.params(ratios), params)):
        if not within_tolerance(model_value, real):
            return f"{what} {model_value:,} by the space, {real:,} by fvcore on the pruned network"
    gap = functional_gap(plan, ratios, pruned, inputs)
    if not gap <= FUNCTIONAL_TOLERANCE:
        return (f"the pruned network computes something other than the base without the removed channels (off by "
                f"{gap:.1e} of the output; the channels are permuted on the way, or mixed)")
    return None


def _check(model: nn.Module, space: PruningSpace, example_inputs: torch.Tensor, shapes: list[tuple[int, ...]],
           strategies: dict[str, np.ndarray], steps: Steps
           ) -> tuple[list[tuple[str, str]], list[tuple[str, int, int]]]:
    """(culprit groups, checked strategies): groups that break a strategy, each found by pruning it alone with its
    ratios in the strategies that fail; each step named on `steps`."""
    plan = PrunePlan(probe_copy(model), space, order=[np.arange(g.units // g.blocks) for g in space.groups])
    inputs = torch.randn(example_inputs.shape, generator=torch.Generator().manual_seed(0)).to(example_inputs)
    failures = {}
    for name, r in strategies.items():
        steps.step(f"proving the {name} strategy (counts and function)")
        failures[name] = _problem(plan, r, example_inputs, inputs, shapes)
    if not any(failures.values()):
        return [], [(name, space.flops(r), space.params(r)) for name, r in strategies.items()]
    failing = [strategies[name] for name, problem in failures.items() if problem]
    steps.step("pruning each group alone to find the ones that break it")
    culprits = []
    for gi, g in enumerate(space.groups):
        for ratios in failing:
            alone = np.zeros(len(space.groups))
            alone[gi] = ratios[gi]
            problem = _problem(plan, alone, example_inputs, inputs, shapes) if ratios[gi] > 0 else None
            if problem:
                culprits.append((g.name, problem))
                break
    if not culprits:
        name, problem = next((n, p) for n, p in failures.items() if p)
        raise SpaceError(f"model: the {name} strategy is not modelled exactly ({problem}), although every group "
                         "alone is; prunetune cannot prune this model")
    return culprits, []


@dataclass(frozen=True)
class PreflightOptions:
    """What a space is proved for: the data's class count and the task the prediction must fit, the search's most
    pruned ratio and the first strategy it will evaluate, channel rounding and the layers never pruned."""

    num_classes: int
    max_ratio: float  # search.max_ratio: the most pruned strategy has it in every group
    first: Callable[[PruningSpace], Sequence[float]]  # the first strategy the search will evaluate in a space
    round_to: int = 1  # search.round_to: channel counts kept in multiples of it
    ignored_layers: Sequence[str] = ()  # model.ignored_layers: never pruned
    task: Task = CLASSIFICATION


def preflight(model: nn.Module, example_inputs: torch.Tensor, options: PreflightOptions) -> Verdict:
    """Build the channel space of `model` and prove it exact, in counts and function, on the most pruned, the first
    and the least pruned strategy (SpaceError if not; any other error while building it becomes one too).

    The model's prediction must fit `options.task` and `options.num_classes`, and every output of a pruned network
    keeps its shape.
    """
    refuse_compiled(model)
    steps = Steps("preflight")
    check_output(model, example_inputs, options.num_classes, options.task)
    shapes = output_shapes(model, example_inputs)
    ignored, left_out = list(options.ignored_layers), list[tuple[str, str]]()
    while True:  # at most twice: once more after leaving out the groups of a single cause
        steps.step("tracing the channel groups")
        space = as_refusal(model, PruningSpace.from_model, model, example_inputs, options.round_to, ignored)
        found = space.rejected  # groups discovery could not model: no strategy needed to know
        if not found:
            strategies = {**strategies_to_prove(space, options.max_ratio, options.first),
                          "least pruned": space.least_pruned()}
            found, checked = as_refusal(model, _check, model, space, example_inputs, shapes, strategies, steps)
            if not found:
                steps.done()
                return Verdict(space, left_out, checked, functional=True)
        causes = list(dict.fromkeys(reason for _, reason in left_out + found))
        if left_out or len(causes) > 1:
            names = list(dict.fromkeys(name for name, _ in left_out + found))
            more = f"; and {len(causes) - 2} more" if len(causes) > 2 else ""
            raise SpaceError(f"model: {len(names)} channel groups cannot be pruned exactly ({'; '.join(causes[:2])}"
                             f"{more}); to prune the rest, set model.ignored_layers=[{','.join(ignored + names)}]")
        left_out = found
        ignored += [name for name, _ in found]


def as_refusal(model: nn.Module, step: Callable, *args):
    """step(*args), where any error but a SpaceError (which names its layer) becomes a SpaceError naming the model."""
    try:
        return step(*args)
    except SpaceError:
        raise
    except Exception as e:
        raise SpaceError(f"model: building the pruning space of {type(model).__name__} fails ({error_line(e)}); "
                         "prunetune cannot prune it") from None
