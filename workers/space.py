"""The strategy space: prunable groups of a model and an exact analytic FLOPs/params model.

A strategy is one pruning ratio per group. Group g keeps `floor(C_g * (1 - r_g))` of its C_g channels, rounded
down to a multiple of its step (the `round_to` multiple, and its block count when grouped convs, GroupNorm or
an equal chunk split it into blocks), at least one step: exactly what `PrunePlan` keeps. FLOPs are fvcore's count (one
multiply-add = 1). Every layer's own FLOPs and every parameter's size are products of at most two channel
dimensions (the layer kinds in `layers.py` say which), and each dimension is linear in the kept counts, so the
pruned network's count is a small quadratic form evaluated in microseconds. FLOPs that fvcore counts inside a
module of no known kind (a functional pooling in a model's forward) are measured on a pruned copy, once.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .groups import (OP, PARAMETER, Group, Discovery, SpaceError, describe_module, dim_size, discover_groups,
                     error_line, find_heads, module_stack)
from .layers import OUT, is_stateless, kind_of
from .prune import PrunePlan


def count_flops(model: nn.Module, example_inputs: torch.Tensor):
    """fvcore's FlopCountAnalysis of `model` in eval mode (warnings off); `.total()`, `.by_module()`. SpaceError
    naming the module where fvcore's trace fails, if it does."""
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), module_stack(model) as stack:
            fca = FlopCountAnalysis(model, example_inputs)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            fca.total()  # runs the trace now, in eval mode
    except Exception as e:
        where = describe_module(model, stack[-1] if stack else "")
        raise SpaceError(f"model: fvcore cannot count the FLOPs of {type(model).__name__}: its trace fails in {where} "
                         f"({error_line(e)})") from None
    finally:
        model.train(was_training)
    return fca


def own_flops(by_module: dict, model: nn.Module, name: str) -> int:
    """FLOPs fvcore counts in a module's own forward, not in its children."""
    prefix = f"{name}." if name else ""
    children = (by_module.get(prefix + child, 0) for child, _ in model.get_submodule(name).named_children())
    return int(by_module.get(name, 0) - sum(children))


class PruningSpace:
    """Prunable groups of a model and the FLOPs/params of any strategy (one ratio per group).

    Internally each pruned layer dimension is a row `d = const + M @ kept`; FLOPs and params are sums of
    `coef * d[a] * d[b]` over fvcore's per-module counts and over parameter tensors (row 0 is the constant 1).
    """

    def __init__(self, groups: list[Group], base_flops: int, base_params: int, dim_const: np.ndarray,
                 dim_matrix: np.ndarray, flops_terms: tuple, params_terms: tuple, round_to: int = 1,
                 ignored_layers: Sequence[str] = (), input_shape: tuple[int, ...] = (),
                 rejected: Sequence[tuple[str, str]] = ()):
        self.groups = groups
        self.input_shape = tuple(input_shape)
        self.base_flops = int(base_flops)
        self.base_params = int(base_params)
        self.round_to = int(round_to)
        self.ignored_layers = list(ignored_layers)  # the classifier first
        self.classifier = self.ignored_layers[0] if self.ignored_layers else ""
        self.rejected = list(rejected)  # (group root, reason): groups left out because no exact model exists
        self.layer_rows: dict[tuple[str, str], int] = {}  # (module, role) -> row of its pruned dimension
        self.latency = None  # a latency.LatencyTable, attached when a budget names latency
        self.unit = "channels"  # what a group's units are: channels, single weights or stripes (the method's)
        self._units = np.array([g.units for g in groups], dtype=np.float64)
        self._steps = np.array([math.lcm(g.blocks, self.round_to) for g in groups], dtype=np.float64)
        self._dim_const, self._dim_matrix = dim_const, dim_matrix
        self._flops_terms, self._params_terms = flops_terms, params_terms
        full = self._units[None, :]
        base = self.flops_of_kept(full)[0]
        for i, g in enumerate(groups):
            k = full.copy()
            k[0, i] = 0
            g.flops_share = float(base - self.flops_of_kept(k)[0]) / max(base, 1.0)

    @classmethod
    def from_model(cls, model: nn.Module, example_inputs: torch.Tensor, round_to: int = 1,
                   ignored_layers: list[str] | None = None) -> "PruningSpace":
        """Discover the groups of `model` and build the analytic FLOPs/params model of fvcore's counts."""
        was_training = model.training
        model.eval()
        try:
            modules = dict(model.named_modules())
            heads = find_heads(model, example_inputs)
            ignored = heads + [n for n in ignored_layers or [] if n not in heads]
            unknown = [n for n in ignored if n not in modules]
            if unknown:
                raise SpaceError(f"model.ignored_layers: the model has no layer named '{unknown[0]}'")
            found = discover_groups(model, example_inputs, ignored)
            fca = count_flops(model, example_inputs)
        finally:
            model.train(was_training)
        found.groups = [g for g in found.groups if math.lcm(g.blocks, round_to) < g.units]
        if not found.groups:
            raise SpaceError("model: no prunable channel group (every conv/linear layer is the classifier, ignored, "
                             "or cannot be pruned exactly" + (f": {found.rejected[0][1]}" if found.rejected else "")
                             + ")")
        space = _build(cls, model, example_inputs, found, fca, round_to, ignored)
        residual = {name: own_flops(fca.by_module(), model, name) for name, m in modules.items()
                    if kind_of(m) is None and not is_stateless(m)}
        residual = {name: amount for name, amount in residual.items() if amount}
        probes = [i for i, g in enumerate(space.groups) if g.name in found.functional]
        if residual and probes:
            space._fit_functional(model, example_inputs, residual, probes)
        return space

    def _fit_functional(self, model: nn.Module, example_inputs: torch.Tensor, residual: dict[str, int],
                        probes: list[int]) -> None:
        """Make FLOPs counted in modules of no known kind scale with the groups that reach them (measured)."""
        plan = PrunePlan(model, self, order=[np.arange(g.units // g.blocks) for g in self.groups])
        constant, coef, a, b = self._flops_terms
        terms = []
        for gi in probes:
            ratios = np.zeros(len(self.groups))
            ratios[gi] = 0.5
            delta = self.kept_units(ratios)[gi] - self.groups[gi].units
            try:
                by_module = count_flops(plan.apply(ratios), example_inputs).by_module()
            except Exception:  # the pruned network does not run: the preflight names the group and why
                continue
            slope = sum(own_flops(by_module, model, name) - amount for name, amount in residual.items()) / delta
            if slope:
                row = len(self._dim_const)  # a row that is the group's kept count itself
                self._dim_const = np.append(self._dim_const, 0.0)
                self._dim_matrix = np.vstack([self._dim_matrix, np.eye(len(self.groups))[gi]])
                terms.append((slope, row))
                constant -= slope * self.groups[gi].units
        if terms:
            coef = np.concatenate([coef, [t[0] for t in terms]])
            a = np.concatenate([a, [t[1] for t in terms]]).astype(np.int64)
            b = np.concatenate([b, np.zeros(len(terms), dtype=np.int64)])
            self._flops_terms = (constant, coef, a, b)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A zero input batch of the shape the space was traced with."""
        return torch.zeros(batch, *self.input_shape)

    def check(self, ratios) -> np.ndarray:
        """Validate a strategy; return it as a float array or raise SpaceError saying what is wrong."""
        r = np.asarray(ratios, dtype=np.float64)
        if r.ndim != 1 or len(r) != len(self.groups):
            raise SpaceError(f"strategy: expected {len(self.groups)} ratios (one per group), got "
                             f"{r.size if r.ndim else 'a scalar'}")
        bad = np.flatnonzero(~np.isfinite(r) | (r < 0) | (r >= 1))
        if len(bad):
            i = int(bad[0])
            raise SpaceError(f"strategy: ratio {r[i]} for group {i} ({self.groups[i].name}) is outside [0, 1)")
        return r

    def least_pruned(self) -> np.ndarray:
        """The strategy that removes the fewest units a pruned group can lose: one step (round_to, blocks) each."""
        return np.clip(0.5 * self._steps / self._units, 0.0, None)

    def kept_units(self, ratios) -> list[int]:
        """Units (channels, weights, stripes) each group keeps under the strategy."""
        return [int(k) for k in self.kept_batch(self.check(ratios)[None, :])[0]]

    def kept_batch(self, ratios: np.ndarray) -> np.ndarray:
        """Kept counts for a [S, G] batch of ratios: floor(C * (1 - r)) down to a multiple of the step, >= 1 step."""
        kept = np.floor(self._units * (1.0 - ratios) / self._steps) * self._steps
        return np.maximum(kept, np.minimum(self._steps, self._units))

    def flops_of_kept(self, kept: np.ndarray) -> np.ndarray:
        """FLOPs for a [S, G] batch of kept-channel counts."""
        return self._evaluate(self._flops_terms, kept)

    def params_of_kept(self, kept: np.ndarray) -> np.ndarray:
        """Parameter counts for a [S, G] batch of kept-channel counts."""
        return self._evaluate(self._params_terms, kept)

    def flops(self, ratios) -> int:
        """fvcore FLOPs of the network pruned by `ratios`."""
        return int(round(float(self.flops_of_kept(self.kept_batch(self.check(ratios)[None, :]))[0])))

    def params(self, ratios) -> int:
        """Parameter count of the network pruned by `ratios`."""
        return int(round(float(self.params_of_kept(self.kept_batch(self.check(ratios)[None, :]))[0])))

    def layer_sizes(self, kept: np.ndarray, name: str, role: str, full: int) -> np.ndarray:
        """Channels of layer `name`'s `role` dimension for a [S, G] batch of kept counts (`full` if not pruned)."""
        row = self.layer_rows.get((name, role))
        if row is None:
            return np.full(len(kept), float(full))
        return self._dim_const[row] + kept @ self._dim_matrix[row]

    def _evaluate(self, terms: tuple, kept: np.ndarray) -> np.ndarray:
        constant, coef, a, b = terms
        d = self._dim_const[None, :] + kept @ self._dim_matrix.T
        return constant + (d[:, a] * d[:, b]) @ coef

    def describe(self) -> str:
        """A table of the groups (name, channels, layers, FLOPs share) and the totals."""
        width = max([len(g.name) for g in self.groups] + [5])
        lines = [f"{'group':<{width}}  {self.unit:>8}  {'layers':>6}  {'FLOPs share':>11}"]
        for g in self.groups:
            layers = len({m.module for m in g.members if m.kind not in (OP, PARAMETER)}) or 1
            blocks = f"  ({g.blocks} blocks)" if g.blocks > 1 else ""
            lines.append(f"{g.name:<{width}}  {g.units:>8}  {layers:>6}  {100 * g.flops_share:>10.2f}%{blocks}")
        lines.append(f"{len(self.groups)} groups; not pruned: {', '.join(self.ignored_layers)} (classifier first)")
        lines.append("FLOPs share: the FLOPs that scale with the group's channels; a layer scales with the group of "
                     "its input and of its output, so the column sums to more than 100%" if self.unit == "channels" else
                     f"FLOPs share: the layer's FLOPs, which scale with its kept {self.unit}")
        lines += [f"left out: the group of {root}: {reason}" for root, reason in self.rejected]
        lines.append(f"FLOPs {self.base_flops:,} ({self.base_flops / 1e6:.2f} M, fvcore); "
                     f"params {self.base_params:,} ({self.base_params / 1e6:.3f} M)")
        return "\n".join(lines)


def _build(cls, model: nn.Module, example_inputs: torch.Tensor, found: Discovery, fca, round_to: int,
           ignored: list[str]) -> PruningSpace:
    """The space of the discovered groups, with FLOPs and params terms from fvcore's per-module counts."""
    groups = found.groups
    by_module, total = fca.by_module(), int(fca.total())
    rows: dict[tuple[str, str], int] = {}
    full_size = [1.0]
    matrix = [np.zeros(len(groups))]
    # A stateless op with FLOPs has a row; so has the op whose output one passed on (a pool to its input's size).
    counted_ops = {name for name, amount in by_module.items() if amount} | \
        {target for name, target in found.aliases.items() if by_module.get(name)}
    for gi, g in enumerate(groups):
        for mem in g.members:
            if mem.kind == OP and mem.module not in counted_ops:
                continue  # a stateless op without FLOPs (activation, permute) counts nothing: no row
            key = (mem.module, mem.role)
            if key not in rows:
                rows[key] = len(full_size)
                full_size.append(float(dim_size(model, mem, found.op_channels)))
                matrix.append(np.zeros(len(groups)))
            matrix[rows[key]][gi] += mem.per_unit
    matrix_arr = np.array(matrix)
    const = np.array(full_size) - matrix_arr @ np.array([g.units for g in groups], dtype=np.float64)
    if (const < 0).any():
        name = next(key for key, row in rows.items() if const[row] < 0)[0]
        raise SpaceError(f"model: the groups reach more channels of {name} than it has; it cannot be pruned exactly")

    def term(name: str, roles: tuple[str, ...], amount: float, out: list) -> None:
        r = [rows[(name, role)] for role in roles if (name, role) in rows]
        out.append((amount / float(np.prod([full_size[i] for i in r])), *(r + [0, 0])[:2]))

    flops: list[tuple] = []
    params: list[tuple] = []
    counted_flops = counted_params = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        kind = kind_of(module)
        amount = own_flops(by_module, model, name)
        if amount and (kind or is_stateless(module)):
            counted_flops += amount
            term(name if kind else found.aliases.get(name, name), kind.flops_roles if kind else (OUT,), amount, flops)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full_name = f"{name}.{pname}" if name else pname
            if (full_name, OUT) in rows:  # a bare parameter coupled to a group (layer scale, token)
                term(full_name, (OUT,), p.numel(), params)
            elif kind:
                term(name, kind.weight_roles if pname == "weight" else (OUT,), p.numel(), params)
            else:
                continue
            counted_params += p.numel()
    base_params = sum(p.numel() for p in model.parameters())

    def pack(constant: float, terms: list) -> tuple:
        arr = np.array(terms, dtype=np.float64).reshape(-1, 3)
        return float(constant), arr[:, 0], arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64)

    # Whatever is counted elsewhere (ops of modules of no known kind, their parameters) is fixed until measured.
    space = cls(groups, total, base_params, const, matrix_arr, pack(total - counted_flops, flops),
                pack(base_params - counted_params, params), round_to, ignored, tuple(example_inputs.shape[1:]),
                found.rejected)
    space.layer_rows = dict(rows)  # (module, role) -> its dimension's row, for models that work per layer (latency)
    return space
