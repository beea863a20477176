"""The strategy space: prunable channel groups of a model and an exact analytic FLOPs/params model.

Groups come from Torch-Pruning's DependencyGraph (coupled layers share one group, depthwise convs follow
their producer, the classifier is never pruned). A strategy is one pruning ratio per group; group g keeps
`int(C_g * (1 - r_g))` channels (rounded down to a multiple of `round_to`, at least one), exactly as
Torch-Pruning's MetaPruner does. FLOPs are fvcore's count (one multiply-add = 1): every counted module's
FLOPs and every parameter tensor's size are products of at most two channel dimensions, and each dimension
is linear in the kept counts, so the pruned network's count is a small quadratic form evaluated in
microseconds. Ops counted outside leaf modules (functional calls in a parent's forward) are taken as fixed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from workers.groups import ChannelGroup, SpaceError, discover_groups, find_classifier, layer_kind

class PruningSpace:
    """Prunable channel groups of a model and the FLOPs/params of any strategy (one ratio per group).

    Internally each pruned layer dimension is a row `d = const + M @ kept`; FLOPs and params are sums of
    `coef * d[a] * d[b]` over fvcore's per-module counts and over parameter tensors (row 0 is the constant 1).
    """

    def __init__(self, groups: list[ChannelGroup], base_flops: int, base_params: int, dim_const: np.ndarray,
                 dim_matrix: np.ndarray, flops_terms: tuple, params_terms: tuple, round_to: int = 1,
                 ignored_layers: list[str] = (), input_shape: tuple[int, ...] = ()):
        self.groups = groups
        self.input_shape = tuple(input_shape)
        self.base_flops = int(base_flops)
        self.base_params = int(base_params)
        self.round_to = int(round_to)
        self.ignored_layers = list(ignored_layers)  # the classifier first
        self.classifier = self.ignored_layers[0] if self.ignored_layers else ""
        self._channels = np.array([g.channels for g in groups], dtype=np.float64)
        self._dim_const, self._dim_matrix = dim_const, dim_matrix
        self._flops_terms, self._params_terms = flops_terms, params_terms
        full = self._channels[None, :]
        base = self.flops_of_kept(full)[0]
        for i, g in enumerate(groups):
            k = full.copy()
            k[0, i] = 0
            g.flops_share = float(base - self.flops_of_kept(k)[0]) / max(base, 1.0)

    @classmethod
    def from_model(cls, model: nn.Module, example_inputs: torch.Tensor, round_to: int = 1,
                   ignored_layers: list[str] | None = None) -> "PruningSpace":
        """Discover the groups of `model` and fit the analytic FLOPs/params model to fvcore's counts."""
        from fvcore.nn import FlopCountAnalysis

        was_training = model.training
        model.eval()
        modules = dict(model.named_modules())
        classifier = find_classifier(model, example_inputs)
        ignored = [classifier] + [n for n in ignored_layers or [] if n != classifier]
        unknown = [n for n in ignored if n not in modules]
        if unknown:
            raise SpaceError(f"model.ignored_layers: the model has no layer named '{unknown[0]}'")
        groups, op_channels = discover_groups(model, example_inputs, ignored)
        with torch.no_grad():
            fca = FlopCountAnalysis(model, example_inputs)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by_module, total = fca.by_module(), int(fca.total())
        model.train(was_training)

        rows: dict[tuple[str, str], int] = {}
        full_size = [1.0]
        matrix = [np.zeros(len(groups))]
        for gi, g in enumerate(groups):
            for mem in g.members:
                key = (mem.module, mem.role)
                if key not in rows:
                    rows[key] = len(full_size)
                    full_size.append(float(_dim_size(modules[mem.module], mem.role, op_channels.get(mem.module))))
                    matrix.append(np.zeros(len(groups)))
                matrix[rows[key]][gi] += len(mem.idxs) / g.channels
        matrix_arr = np.array(matrix)
        const = np.array(full_size) - matrix_arr @ np.array([g.channels for g in groups], dtype=np.float64)

        def term(name: str, roles: tuple[str, ...], amount: float, out: list) -> None:
            r = [rows[(name, role)] for role in roles if (name, role) in rows]
            out.append((amount / float(np.prod([full_size[i] for i in r])), *(r + [0, 0])[:2]))

        flops, params = [], []
        leaf_flops = leaf_params = 0
        for name, module in modules.items():
            if list(module.children()):
                continue
            kind = layer_kind(module)
            both = ("out", "in") if kind in ("conv", "linear") else ("out",)
            if by_module.get(name, 0):
                leaf_flops += int(by_module[name])
                term(name, both, by_module[name], flops)
            for pname, p in module.named_parameters(recurse=False):
                leaf_params += p.numel()
                term(name, both if pname == "weight" else ("out",), p.numel(), params)
        base_params = sum(p.numel() for p in model.parameters())

        def pack(constant: float, terms: list) -> tuple:
            arr = np.array(terms, dtype=np.float64).reshape(-1, 3)
            return float(constant), arr[:, 0], arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64)

        # Ops run directly in a non-leaf forward (and parameters held by non-leaf modules) are fixed.
        return cls(groups, total, base_params, const, matrix_arr, pack(total - leaf_flops, flops),
                   pack(base_params - leaf_params, params), round_to, ignored, tuple(example_inputs.shape[1:]))

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

    def kept_channels(self, ratios) -> list[int]:
        """Channels each group keeps under the strategy (Torch-Pruning's rounding)."""
        return [int(k) for k in self.kept_batch(self.check(ratios)[None, :])[0]]

    def kept_batch(self, ratios: np.ndarray) -> np.ndarray:
        """Kept counts for a [S, G] batch of ratios: int(C * (1 - r)), rounded down to round_to, at least 1."""
        kept = np.floor(self._channels * (1.0 - ratios))
        if self.round_to > 1:
            kept = np.maximum(kept - kept % self.round_to, np.minimum(self.round_to, self._channels))
        return np.maximum(kept, 1.0)

    def flops_of_kept(self, kept: np.ndarray) -> np.ndarray:
        """FLOPs for a [S, G] batch of kept-channel counts."""
        return self._evaluate(self._flops_terms, kept)

    def flops(self, ratios) -> int:
        """fvcore FLOPs of the network pruned by `ratios`."""
        return int(round(float(self.flops_of_kept(self.kept_batch(self.check(ratios)[None, :]))[0])))

    def params(self, ratios) -> int:
        """Parameter count of the network pruned by `ratios`."""
        return int(round(float(self._evaluate(self._params_terms, self.kept_batch(self.check(ratios)[None, :]))[0])))

    def _evaluate(self, terms: tuple, kept: np.ndarray) -> np.ndarray:
        constant, coef, a, b = terms
        d = self._dim_const[None, :] + kept @ self._dim_matrix.T
        return constant + (d[:, a] * d[:, b]) @ coef

    def flops_range(self, max_ratio: float) -> tuple[float, float]:
        """Lowest and highest FLOPs fraction reachable with every ratio in [0, max_ratio]."""
        lowest = self.flops_of_kept(self.kept_batch(np.full((1, len(self.groups)), max_ratio)))[0]
        return float(lowest) / self.base_flops, 1.0

    def describe(self) -> str:
        """A table of the groups (name, channels, layers, FLOPs share) and the totals."""
        width = max([len(g.name) for g in self.groups] + [5])
        lines = [f"{'group':<{width}}  {'channels':>8}  {'layers':>6}  {'FLOPs share':>11}"]
        for g in self.groups:
            layers = len({m.module for m in g.members if m.kind != "op"})
            lines.append(f"{g.name:<{width}}  {g.channels:>8}  {layers:>6}  {100 * g.flops_share:>10.2f}%")
        lines.append(f"{len(self.groups)} groups; not pruned: {', '.join(self.ignored_layers)} (classifier first)")
        lines.append(f"FLOPs {self.base_flops:,} ({self.base_flops / 1e6:.2f} M, fvcore); "
                     f"params {self.base_params:,} ({self.base_params / 1e6:.3f} M)")
        return "\n".join(lines)


def _dim_size(module: nn.Module, role: str, op_channels: int | None) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if role == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if role == "out" else module.in_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if op_channels is None:
        raise SpaceError(f"model: cannot tell the channel count of layer {type(module).__name__}")
    return op_channels
