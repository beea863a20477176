"""A latency model measured once per device: per-layer look-up tables, interpolated, calibrated on whole nets.

The NetAdapt / HALP idea: every layer of a known kind (conv, depthwise, grouped, linear, norms) is timed alone,
at its real input size, on a grid of its channel counts (both dimensions where both can be pruned), on the
target device with the configured batch size and CPU threads. A strategy's latency is read off the tables by
interpolation, summed, and mapped onto whole-network latency by a least-squares fit on a few pruned networks
timed whole (the fit absorbs what the tables do not see: activations, additions, pooling, per-call overhead).
The tables are made non-decreasing in every channel count, so a prediction never falls when a strategy keeps
more channels: the sampler's walk relies on that. Tables are cached by architecture, input shape, runtime, device,
machine, batch size, threads and library versions (`load_or_build`). The runtime is eager PyTorch, ONNX Runtime or
OpenVINO (`latency.runtime`): the layers, the fitted networks and every candidate are timed in it, as deployed.

Load spikes must not decide a table: every timing is taken in interleaved rounds (each round times every grid point,
or every fitted network, a few passes) and the median of the rounds' medians is kept. A table whose fit still misses
its own networks by more than the bound is timed again with twice the passes; if it misses still, it is refused in
one line and never cached, and a cached or saved table over the bound is never used.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .errors import BadInput, RunFailed
from .files import unwritable, write_json
from .layers import IN, OUT, kind_of
from .prune import PrunePlan
from .space import PruningSpace
from .timing import RUNTIMES, Timing, interleaved

# Kernels run channels in vector-width blocks: on this AVX-512 CPU a 3x3 conv (56 px, 128 inputs) with 65-80
# output channels takes about as long as one with 80 (steps of 16 measured at 64, 80, 96, 112). Tables are timed
# at multiples of 8 and a count is read as the next multiple of 8.
CHANNEL_MULTIPLE = 8
FIT_ERROR_BOUND = 0.15  # latency.max_fit_error's default: a table that predicts its own networks worse is refused


@dataclass
class LayerTable:
    """Measured latency of one layer over a grid of its channel counts."""

    name: str
    full_out: int
    full_in: int
    out_sizes: list[float]  # grid of out channel counts (one point when the dimension is never pruned)
    in_sizes: list[float]  # grid of in channel counts (one point for coupled kinds: norms, depthwise)
    ms: list[list[float]]  # [len(in_sizes)][len(out_sizes)] milliseconds, non-decreasing along both axes


@dataclass
class LatencyTable:
    """Per-layer tables plus the whole-network fit: predict(space, kept) gives milliseconds."""

    key: str
    device: str
    batch_size: int
    threads: int | None
    repeats: int
    multiple: int  # a channel count is read as the next multiple of this (the kernels' vector width)
    layers: list[LayerTable]
    intercept_ms: float = 0.0
    scale: float = 1.0
    base_ms: float = 0.0  # the unpruned network, timed whole
    fit_errors: list[float] = field(default_factory=list)  # |predicted - timed| / timed on the fit's networks
    runtime: str = "torch"  # what every figure is timed in (timing.RUNTIMES): eager PyTorch, ONNX Runtime, OpenVINO

    def predict(self, space: PruningSpace, kept: np.ndarray) -> np.ndarray:
        """Predicted latency in milliseconds for a [S, G] batch of kept counts of `space`."""
        kept = np.atleast_2d(np.asarray(kept, dtype=np.float64))
        return self.intercept_ms + self.scale * self.layer_sum(space, kept)

    def layer_sum(self, space: PruningSpace, kept: np.ndarray) -> np.ndarray:
        """Sum of the interpolated per-layer latencies for a [S, G] batch of kept counts."""
        return self.layer_ms(space, kept).sum(axis=1)

    def layer_ms(self, space: PruningSpace, kept: np.ndarray) -> np.ndarray:
        """The interpolated latency of every layer of the table ([S, L], milliseconds) for a [S, G] batch."""
        kept = np.atleast_2d(np.asarray(kept, dtype=np.float64))
        columns = []
        for t in self.layers:
            out = self._padded(space.layer_sizes(kept, t.name, OUT, t.full_out), t.full_out)
            inp = self._padded(space.layer_sizes(kept, t.name, IN, t.full_in), t.full_in) \
                if len(t.in_sizes) > 1 else None
            columns.append(_interpolate(t, out, inp))
        return np.stack(columns, axis=1) if columns else np.zeros((len(kept), 0))

    def _padded(self, channels: np.ndarray, full: int) -> np.ndarray:
        """Channel counts as the kernels run them: up to the next multiple of `multiple`, at most `full`."""
        return np.minimum(np.ceil(channels / self.multiple) * self.multiple, full)

    def time(self, model: nn.Module, device: torch.device, input_shape: tuple[int, ...]) -> Timing:
        """Time a (pruned) network as the table timed its own: its batch size, threads, repeats and runtime, in the
        same rounds."""
        example = torch.zeros(self.batch_size, *input_shape, device=device)
        return interleaved([(model, example)], self.repeats, self.threads, self.runtime)[0]

    def describe(self, space: PruningSpace) -> str:
        """Per group, the share of the base's predicted latency that scales with its channels; then the fit."""
        full = space.kept_batch(np.zeros((1, len(space.groups))))
        base = float(self.predict(space, full)[0])
        width = max([len(g.name) for g in space.groups] + [5])
        lines = [f"{'group':<{width}}  {'latency share':>13}"]
        for i, g in enumerate(space.groups):
            fewest = full.copy()
            fewest[0, i] = space.kept_batch(np.full((1, len(space.groups)), 0.999))[0, i]
            lines.append(f"{g.name:<{width}}  {100 * (base - float(self.predict(space, fewest)[0])) / base:>12.2f}%")
        lines.append(f"latency ({self.runtime} on {self.device}, batch {self.batch_size}, threads {self.threads}): "
                     f"base {self.base_ms:.3f} ms timed, {base:.3f} ms predicted; {len(self.layers)} layers in the "
                     "table; "
                     f"fit on the base and {len(self.fit_errors) - 1} pruned networks, worst error "
                     f"{100 * self.worst_error:.1f}%")
        lines.append("latency share: what the base's predicted latency loses when the group keeps its fewest channels")
        return "\n".join(lines)

    @property
    def worst_error(self) -> float:
        """The largest relative error of the fit on the networks it was fitted to (0 before fitting)."""
        return max(self.fit_errors, default=0.0)

    def to_dict(self) -> dict:
        """The table as plain JSON-able data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        """A table from `to_dict`'s output."""
        return cls(**{**d, "layers": [LayerTable(**t) for t in d["layers"]]})


# A pruned layer whose time fell by less than this fraction of what its channels fell is named as not faster.
SLOW_TO_FALL = 0.5


@dataclass(frozen=True)
class LayerCost:
    """One layer's predicted latency before and after pruning, and why it may not have fallen with its channels."""

    name: str
    base_ms: float  # in the unpruned network (the table's share of the fit)
    pruned_ms: float
    channels: tuple[int, int]  # kept (out, in) channels of the pruned layer
    full: tuple[int, int]  # (out, in) channels of the unpruned layer
    misaligned: bool  # a kept count is not a multiple of the kernels' block: it runs as the next multiple
    why: str  # empty, or what costs speed: "17 runs as 24", "time -25% for channels -50%"


def where_time_went(table: LatencyTable, space: PruningSpace, kept: np.ndarray) -> list[LayerCost]:
    """Per layer of the table, its predicted latency in the base and in the network that keeps `kept` ([G] counts),
    and why a pruned layer is slower than its channels say: a kept count that is not a multiple of the kernels'
    block (it runs as the next multiple), or time that fell by less than half what its channel products fell
    (memory-bound, depthwise, or per-call overhead)."""
    full_kept = space.kept_batch(np.zeros((1, len(space.groups))))
    both = np.concatenate([full_kept, np.atleast_2d(np.asarray(kept, dtype=np.float64))])
    ms = table.scale * table.layer_ms(space, both)
    ms[1] = np.minimum(ms[1], ms[0])  # on a flat stretch of a table, interpolation can exceed it by a rounding error
    costs = []
    for i, t in enumerate(table.layers):
        out = int(space.layer_sizes(both[1:], t.name, OUT, t.full_out)[0])
        inp = int(space.layer_sizes(both[1:], t.name, IN, t.full_in)[0])
        pruned = [(n, full) for n, full in ((out, t.full_out), (inp, t.full_in)) if n < full]
        misaligned = [n for n, _ in pruned if n % table.multiple]
        channel_fall = 1 - float(np.prod([n / full for n, full in pruned])) if pruned else 0.0
        time_fall = 1 - ms[1, i] / ms[0, i] if ms[0, i] > 0 else 0.0
        why = ""
        if misaligned:
            runs = [int(-(-n // table.multiple) * table.multiple) for n in misaligned]
            why = f"{', '.join(map(str, misaligned))} run{'s' * (len(runs) == 1)} as {', '.join(map(str, runs))}"
        elif pruned and time_fall < SLOW_TO_FALL * channel_fall:
            why = f"time -{100 * time_fall:.0f}% for channels -{100 * channel_fall:.0f}%"
        costs.append(LayerCost(t.name, float(ms[0, i]), float(ms[1, i]), (out, inp), (t.full_out, t.full_in),
                               bool(misaligned), why))
    return costs


def describe_costs(costs: list[LayerCost], multiple: int = CHANNEL_MULTIPLE, limit: int = 10) -> str:
    """Where the time went (Markdown): the `limit` slowest layers of the pruned network, then what costs speed."""
    lines = ["| layer | out, in channels kept | base ms | pruned ms | why not faster |", "|---|---|---:|---:|---|"]
    for c in sorted(costs, key=lambda c: -c.pruned_ms)[:limit]:
        lines.append(f"| {c.name} | {c.channels[0]}/{c.full[0]}, {c.channels[1]}/{c.full[1]} | {c.base_ms:.4f} | "
                     f"{c.pruned_ms:.4f} | {c.why} |")
    misaligned = [c for c in costs if c.misaligned]
    slow = [c for c in costs if c.why and not c.misaligned]
    if misaligned:
        lines.append(f"\n{len(misaligned)} of {len(costs)} layers keep channel counts the kernels round up to blocks "
                     f"of {multiple} ({', '.join(c.name for c in misaligned[:3])}{', ...' * (len(misaligned) > 3)}): "
                     f"set search.round_to={multiple} so that what is pruned is also faster.")
    if slow:
        lines.append(f"\n{len(slow)} layers' time fell by less than half what their channels fell "
                     f"({', '.join(c.name for c in slow[:3])}{', ...' * (len(slow) > 3)}): memory-bound, depthwise or "
                     "per-call overhead; pruning them saves FLOPs more than time.")
    return "\n".join(lines)


def _interpolate(t: LayerTable, out: np.ndarray, inp: np.ndarray | None) -> np.ndarray:
    """Bilinear interpolation in a layer's grid (clamped at its ends)."""
    ms = np.asarray(t.ms, dtype=np.float64)
    ms = np.repeat(ms, 2, axis=1) if ms.shape[1] == 1 else ms  # a one-point grid: constant along that axis
    ms = np.repeat(ms, 2, axis=0) if ms.shape[0] == 1 else ms
    wo, jo = _weights(np.asarray(t.out_sizes), out)
    if inp is None:
        row = ms[0]
        return row[jo] * (1 - wo) + row[jo + 1] * wo
    wi, ji = _weights(np.asarray(t.in_sizes), inp)
    low = ms[ji, jo] * (1 - wo) + ms[ji, jo + 1] * wo
    high = ms[ji + 1, jo] * (1 - wo) + ms[ji + 1, jo + 1] * wo
    return low * (1 - wi) + high * wi


def _weights(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interpolation weight and left index of each x in a sorted grid (a one-point grid: weight 0, index 0)."""
    if len(grid) == 1:
        return np.zeros(len(x)), np.zeros(len(x), dtype=np.int64)
    j = np.clip(np.searchsorted(grid, x) - 1, 0, len(grid) - 2)
    w = np.clip((x - grid[j]) / (grid[j + 1] - grid[j]), 0.0, 1.0)
    return w, j


def device_name(device: torch.device) -> str:
    """The device as the cache key names it: the GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_key(model: nn.Module, space: PruningSpace, example: torch.Tensor, threads: int | None, grid: int,
              repeats: int, runtime: str = "torch") -> str:
    """The cache key of a table: architecture, pruned dimensions, input shape, runtime and its version, device,
    machine, batch size, threads."""
    parts = {"arch": str(model), "pruned": sorted(map(list, space.layer_rows)), "input": list(example.shape),
             "runtime": runtime, "version": RUNTIMES[runtime].version(), "torch": torch.__version__,
             "device": device_name(example.device),
             "machine": platform.node(), "threads": threads, "grid": grid, "repeats": repeats, "format": 3}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _grid(full: int, points: int, step: int) -> list[float]:
    """Channel counts to time a dimension at: `points` from one step to full, multiples of `step` (or full)."""
    if points <= 1 or full <= step:
        return [float(full)]
    sizes = np.unique(np.minimum(full, np.maximum(step, np.ceil(np.linspace(step, full, points) / step) * step)))
    return [float(s) for s in sizes]


def _resized(module: nn.Module, sizes: dict[str, int]) -> nn.Module:
    """A copy of a layer with the first `sizes[role]` channels of each dimension (the layer kinds' slicing)."""
    kind = kind_of(module)
    assert kind is not None, "only layers of a known kind are timed"
    m = copy.deepcopy(module)
    for role, n in sizes.items():
        keep = torch.from_numpy(kind.local_index(m, role, np.arange(n)))
        for attr, axis in kind.tensors(m, role):
            old = getattr(m, attr)
            new = old.detach().index_select(axis, keep.to(old.device))
            setattr(m, attr, nn.Parameter(new, requires_grad=False) if isinstance(old, nn.Parameter) else new)
        kind.resize(m, role, n)
    return m


def _layer_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The input shape each layer of a known kind sees in one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module, args) -> None:  # returns None: the inputs pass unchanged
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if kind_of(m) is not None]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def interleaved_ms(runs: list[tuple[nn.Module, torch.Tensor]], repeats: int, threads: int | None,
                   runtime: str = "torch") -> list[float]:
    """Milliseconds of each (model, input) in `runtime`, timed in interleaved rounds (timing.interleaved)."""
    return [t.median_ms for t in interleaved(runs, repeats, threads, runtime)]


def _time_layer(module: nn.Module, shape: tuple[int, ...], out_sizes: list[float], in_sizes: list[float],
                coupled: bool, channel_axis: int, device: torch.device, repeats: int, threads: int | None,
                runtime: str) -> list[list[float]]:
    """Milliseconds of the layer at every grid point (timed interleaved), made non-decreasing along both axes."""
    runs = []
    for c_in in in_sizes:
        for c_out in out_sizes:
            sizes = {OUT: int(c_out)} if coupled else {OUT: int(c_out), IN: int(c_in)}
            x_shape = list(shape)
            x_shape[channel_axis] = int(c_out if coupled else c_in)
            runs.append((_resized(module, sizes), torch.randn(x_shape, device=device)))
    ms = np.array(interleaved_ms(runs, repeats, threads, runtime)).reshape(len(in_sizes), len(out_sizes))
    ms = np.maximum.accumulate(np.maximum.accumulate(ms, axis=0), axis=1)
    return ms.tolist()


def build_table(model: nn.Module, space: PruningSpace, example: torch.Tensor, threads: int | None = None,
                grid: int = 6, repeats: int = 20, fit_strategies: int = 16, max_ratio: float = 0.7,
                seed: int = 0, multiple: int = CHANNEL_MULTIPLE, runtime: str = "torch") -> LatencyTable:
    """Time every layer of `model` in `runtime` on `example`'s device and batch size over a grid of its channel
    counts (multiples of `multiple`), then fit the sum of the tables to `fit_strategies` pruned networks timed
    whole."""
    device = example.device
    model = copy.deepcopy(model).to(device).eval()  # the caller's model stays where it is
    shapes = _layer_inputs(model, example)
    measured: dict[tuple, list[list[float]]] = {}  # layers of one shape are timed once
    layers = []
    for name, m in model.named_modules():
        kind = kind_of(m)
        if kind is None or name not in shapes:
            continue
        full_out, full_in = kind.size(m, OUT), kind.size(m, IN)
        step = math.lcm(kind.blocks(m), multiple)
        out_sizes = _grid(full_out, grid if (name, OUT) in space.layer_rows else 1, step)
        pruned_in = not kind.coupled and (name, IN) in space.layer_rows
        in_sizes = _grid(full_in, grid if pruned_in else 1, step)
        channel_axis = 1 if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or kind.name in ("batchnorm",
                                                                                              "groupnorm", "prelu") \
            else len(shapes[name]) - 1
        signature = (repr(m), shapes[name], tuple(out_sizes), tuple(in_sizes))
        if signature not in measured:
            measured[signature] = _time_layer(m, shapes[name], out_sizes, in_sizes, kind.coupled, channel_axis,
                                              device, repeats, threads, runtime)
        layers.append(LayerTable(name, full_out, full_in, out_sizes, in_sizes, measured[signature]))
    table = LatencyTable(table_key(model, space, example, threads, grid, repeats, runtime), device_name(device),
                         int(example.shape[0]), threads, repeats, multiple, layers, runtime=runtime)
    plan = PrunePlan(model, space, order=[np.arange(g.units // g.blocks) for g in space.groups])
    rng = np.random.default_rng(seed)
    strategies = [np.zeros(len(space.groups))] + [rng.uniform(0, max_ratio, len(space.groups)) * level
                                                  for level in np.linspace(0.2, 1.0, fit_strategies)]
    kept = space.kept_batch(np.array(strategies))
    whole = torch.zeros(table.batch_size, *example.shape[1:], device=device)
    timed = np.array(interleaved_ms([(plan.apply(r), whole) for r in strategies], repeats, threads, runtime))
    sums = table.layer_sum(space, kept)
    slope, intercept = np.polyfit(sums, timed, 1)
    if slope <= 0:  # the tables do not explain the spread: scale them onto the timings through the origin
        slope, intercept = float(timed @ sums / (sums @ sums)), 0.0
    table.scale, table.intercept_ms, table.base_ms = float(slope), float(intercept), float(timed[0])
    table.fit_errors = [float(e) for e in np.abs(table.predict(space, kept) - timed) / timed]
    return table


class CacheError(BadInput, ValueError):
    """The cache directory cannot take a latency table that would be built."""


class UnreliableTable(RunFailed):
    """The latency table's fit misses its own networks by more than the bound, also when timed again."""


def read_table(path: str, key: str, max_fit_error: float = FIT_ERROR_BOUND) -> LatencyTable | None:
    """The table saved at `path` if it is readable, has this key and fits within `max_fit_error`, else None."""
    try:
        with open(path) as f:
            table = LatencyTable.from_dict(json.load(f))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return table if table.key == key and table.worst_error <= max_fit_error else None


def reliable_table(model: nn.Module, space: PruningSpace, example: torch.Tensor, threads: int | None, grid: int,
                   repeats: int, max_fit_error: float, runtime: str = "torch") -> LatencyTable:
    """A table built now whose worst fit error is within `max_fit_error`: timed again with twice the passes if the
    first one is not; UnreliableTable if neither is."""
    table = build_table(model, space, example, threads, grid, repeats, runtime=runtime)
    if table.worst_error > max_fit_error:
        first = table.worst_error
        table = build_table(model, space, example, threads, grid, 2 * repeats, runtime=runtime)
        table.key, table.repeats = table_key(model, space, example, threads, grid, repeats, runtime), repeats
        if table.worst_error > max_fit_error:
            raise UnreliableTable(
                f"latency: the table's fit misses its own networks by up to {100 * table.worst_error:.1f}% (first "
                f"{100 * first:.1f}%, then with {2 * repeats} passes per figure), over latency.max_fit_error="
                f"{max_fit_error:g}: the machine's load decides the timings; time it on an idle machine, raise "
                "latency.repeats, or budget FLOPs instead (search.constraint=flops); nothing was cached")
    return table


def load_or_build(model: nn.Module, space: PruningSpace, example: torch.Tensor, cache_dir: str,
                  threads: int | None = None, grid: int = 6, repeats: int = 20,
                  saved: str | None = None, max_fit_error: float = FIT_ERROR_BOUND,
                  runtime: str = "torch") -> tuple[LatencyTable, str, bool]:
    """The table a run saved (`saved`, if it has this key), or the cached one for this architecture, input and
    device, or one built now (`reliable_table`) and cached; its path; and whether it was built now. A table over
    `max_fit_error` is never read nor written."""
    key = table_key(model, space, example, threads, grid, repeats, runtime)
    path = os.path.join(cache_dir, "latency", f"{key}.json")
    for candidate in filter(None, (saved, path)):
        table = read_table(candidate, key, max_fit_error)
        if table is not None:
            return table, candidate, False
    reason = unwritable(os.path.dirname(path))  # before the minutes of timing, not after
    if reason:
        raise CacheError(f"output.cache_dir: cannot write the latency table to {os.path.dirname(path)} ({reason}); "
                         "make it writable, or set output.cache_dir to a directory you can write")
    table = reliable_table(model, space, example, threads, grid, repeats, max_fit_error, runtime)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, table.to_dict())
    return table, path, True
