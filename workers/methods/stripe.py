"""Stripe-wise pruning (SP, "Pruning Filter in Filter", Meng et al., NeurIPS 2020): one ratio per k x k conv.

A filter of C x k x k is k*k stripes, each a 1 x 1 filter over the C input channels at one kernel position. A
strategy removes the given fraction of a layer's stripes, the weakest first (the L1 norm of each stripe; after
Filter Skeleton training, `skeleton_train`, that norm carries the learned stripe importance). The pruned layer,
`StripeConv2d`, stores only its kept stripes and runs only them: for each kernel position, one 1 x 1 conv over
the input shifted to that position, into the filters that keep a stripe there, added up. Its output equals the
dense conv with the pruned stripes zeroed; fvcore counts its FLOPs as the kept stripes' (one C-wide multiply-add
per kept stripe and output pixel), which is what the space predicts.
"""
from __future__ import annotations

from typing import cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DataBundle
from ..finetune import FinetuneOptions, finetune
from ..layers import weight_of
from ..preflight import PreflightOptions, Verdict
from ..space import PruningSpace
from ..settings import FinetuneSettings
from ..sparsity import sparsity_options
from .protocol import SparsityTraining, as_deployed, as_stored, plain_state
from .units import UnitPlan, fvcore_counts, layer_importance, linear_space, prove


def stripe_layers(model: nn.Module, ignored: list[str]) -> list[str]:
    """The convs whose filters have stripes to prune: 2-D, kernel larger than 1 x 1, not grouped."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Conv2d and m.groups == 1 and m.kernel_size != (1, 1) and name not in ignored
            and m.padding_mode == "zeros" and isinstance(m.padding, tuple)]


def stripe_space(model: nn.Module, example_inputs: torch.Tensor, round_to: int = 1,
                 ignored_layers: list[str] | None = None) -> PruningSpace:
    """One group per k x k conv, its units the Cout * k * k stripes; FLOPs and params on kept stripes."""
    return linear_space(model, example_inputs, ignored_layers, stripe_layers, _stripe_count, "no k x k conv to prune "
                        "stripes of (stripes need 2-D, ungrouped convs with kernels larger than 1 x 1)", "stripes")


def _conv(model: nn.Module, name: str = "") -> nn.Conv2d:
    """Layer `name` of `model` (the model itself without a name), one that stripe_layers selected: an nn.Conv2d."""
    return cast(nn.Conv2d, model.get_submodule(name))


def _stripe_count(layer: nn.Module) -> int:
    """The stripes of a conv stripe_layers selected: Cout * k * k."""
    conv = _conv(layer)
    return conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]


def stripe_importance(model: nn.Module, space: PruningSpace, criterion: str = "l1", seed: int = 0
                      ) -> list[np.ndarray]:
    """Per layer, the importance of each stripe (filter-major: stripe o * k*k + position): its L1 norm (l2: the
    squared L2 norm), or seeded random."""
    return layer_importance(model, space, criterion, seed, METHOD,
                            lambda w: w.permute(0, 2, 3, 1).reshape(-1, w.shape[1]))


def stripe_norms(model: nn.Module) -> np.ndarray:
    """The L1 norm of every stripe of every k x k conv (what Filter Skeleton training makes sparse)."""
    return torch.cat([weight_of(model, n).detach().abs().sum(1).flatten().cpu()
                      for n in stripe_layers(model, [])]).numpy()


class StripeConv2d(nn.Module):
    """A conv that keeps only some stripes: per kernel position, a 1 x 1 conv into the filters that keep it."""

    stripe_index: torch.Tensor  # a buffer: the kept stripes, o * k*k + position

    def __init__(self, conv: nn.Conv2d, kept: torch.Tensor):
        super().__init__()
        if not isinstance(conv.padding, tuple):  # stripe_layers selects convs of explicit padding only
            raise ValueError(f"StripeConv2d: padding {conv.padding!r} is not explicit")
        self.out_channels, self.in_channels = conv.out_channels, conv.in_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding: tuple[int, ...] = conv.padding
        self.dilation = conv.dilation
        kk = self.kernel_size[0] * self.kernel_size[1]
        kept = torch.as_tensor(kept, dtype=torch.long).sort().values  # flat stripe indices o * k*k + position
        stripes = conv.weight.detach().flatten(2)  # [Cout, C, k*k]
        self.weight = nn.Parameter(stripes[kept // kk, :, kept % kk].clone())  # [kept, C]
        self.register_buffer("stripe_index", kept.to(conv.weight.device))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self._positions_of: tuple | None = None  # (the stripe_index they were read from, the positions)

    def positions(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Per kernel position with kept stripes: (position, rows of `weight`, their filters); read from
        `stripe_index` once, again only when the buffer changes (load_state_dict, a move to another device)."""
        index = self.stripe_index
        source = (index.device, index.data_ptr(), index._version)
        if self._positions_of is None or self._positions_of[0] != source:
            kk = self.kernel_size[0] * self.kernel_size[1]
            rows = [(p, (index % kk == p).nonzero().flatten()) for p in range(kk)]
            self._positions_of = source, [(p, r, index[r] // kk) for p, r in rows if len(r)]
        return self._positions_of[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        n, _, h, w = x.shape
        ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        x = F.pad(x, (pw, pw, ph, ph))
        out = x.new_zeros(n, self.out_channels, ho, wo)
        for p, rows, filters in self.positions():
            i, j = divmod(p, kw)
            shifted = x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            out.index_add_(1, filters, F.conv2d(shifted, self.weight[rows][:, :, None, None]))
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


def _stripe_conv(pruned: nn.Module, base: nn.Module, name: str, kept: torch.Tensor) -> None:
    """Replace conv `name` of the copy by a StripeConv2d of the base conv's stripes `kept`."""
    owner, _, attr = name.rpartition(".")
    setattr(pruned.get_submodule(owner) if owner else pruned, attr, StripeConv2d(_conv(base, name), kept))


def skeleton_train(model: nn.Module, data: DataBundle, settings: FinetuneSettings, strength: float,
                   options: FinetuneOptions | None = None) -> None:
    """Filter Skeleton training: learn one scale per stripe (initialised to 1, L1-penalised) multiplied onto
    every k x k conv's weight, then fold the scales into the weights (in place; on options.train_indices of the
    training split if given)."""
    from torch.nn.utils import parametrize

    class Skeleton(nn.Module):
        def __init__(self, conv: nn.Conv2d):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(conv.out_channels, 1, *conv.kernel_size, device=conv.weight.device))

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight * self.scale

    convs = [_conv(model, n) for n in stripe_layers(model, [])]
    skeletons = [Skeleton(conv) for conv in convs]
    for conv, skeleton in zip(convs, skeletons):
        parametrize.register_parametrization(conv, "weight", skeleton)
    scales = [s.scale for s in skeletons]
    try:
        finetune(model, data, settings, sparsity_options(options or FinetuneOptions(), scales, strength))
    finally:
        for conv in convs:
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)


class Stripe:
    """Stripe-wise pruning: each k x k conv keeps its strongest 1 x 1 stripes and runs only them."""

    name, title, units = "stripe", "stripe-wise pruning", "stripes"
    criteria: tuple[str, ...] = ("l1", "l2", "random")
    comparable = False
    latency = False  # the latency table times dense layers by their channel counts
    round_to = False
    sparsity: SparsityTraining | None = SparsityTraining("Filter Skeleton", "stripe L1 norm", stripe_norms,
                                                         skeleton_train)
    report_note: str | None = None

    space = staticmethod(stripe_space)
    importance = staticmethod(stripe_importance)

    def preflight(self, model: nn.Module, example_inputs: torch.Tensor, options: PreflightOptions) -> Verdict:
        """Build the space and prove it: the pruned networks run, have the right output width, and fvcore's FLOPs
        and their parameter counts equal the space's."""
        return prove(self, model, example_inputs, options, fvcore_counts, "fvcore's count")

    def plan(self, model: nn.Module, space: PruningSpace, criterion: str = "l1", seed: int = 0) -> UnitPlan:
        """Copies of the base model whose k x k convs are StripeConv2d of their most important stripes."""
        return UnitPlan(model, space, stripe_importance(model, space, criterion, seed), _stripe_conv)

    deployable, pack, unpack = staticmethod(as_deployed), staticmethod(plain_state), staticmethod(as_stored)


METHOD = Stripe()
