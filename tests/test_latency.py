"""Latency budgets: the timing helper, the latency table, budgets in the sampler, the over-budget rule."""
from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from prunetune.search.config import ConfigError, load_config
from prunetune.search.sampler import StrategySampler
from prunetune.search.trials import check_latency
from prunetune.workers.constraints import CONSTRAINTS, Budget, parse_budget
from prunetune.workers.groups import SpaceError
from prunetune.workers import latency, timing
from prunetune.workers.files import write_json
from prunetune.workers.latency import LatencyTable, LayerTable, build_table, load_or_build, read_table
from prunetune.workers.models import build_model
from prunetune.workers.record import CandidateRecord, best
from prunetune.workers.space import PruningSpace
from prunetune.workers.timing import Timing, time_forward

from tests.archs import GroupedSE


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3).eval()
    space = PruningSpace.from_model(model, torch.zeros(1, 3, 32, 32))
    return model, space


def _modelled_time(model, example, repeats=30, warmup=5, threads=None, runtime="torch") -> Timing:
    """A CPU's latency as a model, not a clock (the same on every machine, busy or not): a fixed cost per layer
    run, 40% of the base's latency on resnet20, and a cost per multiply-accumulate of its convs and linears."""
    cost = []

    def count(module, args, output):
        macs = module.weight.numel() * output[0, 0].numel() if isinstance(module, (nn.Conv2d, nn.Linear)) else 0
        cost.append(0.0045 + 1e-8 * macs * example.shape[0])

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return Timing(sum(cost), 0.0, repeats)


@pytest.fixture(scope="module")
def table(resnet20):
    """resnet20's table from modelled timings: what a test asserts of it cannot depend on the machine's load."""
    model, space = resnet20
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timing, "time_forward", _modelled_time)
        return build_table(model, space, torch.zeros(1, 3, 32, 32), threads=1, grid=3, repeats=3, fit_strategies=4)


def test_time_forward_reports_a_median_and_spread_and_restores_threads_and_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).train()
    threads = torch.get_num_threads()
    t = time_forward(model, torch.zeros(2, 3, 16, 16), repeats=5, warmup=1, threads=1)
    assert t.median_ms > 0 and t.iqr_ms >= 0 and t.repeats == 5
    assert model.training and torch.get_num_threads() == threads
    assert Timing(10.0, 2.0, 5).stable and not Timing(10.0, 3.0, 5).stable


def test_the_table_predicts_more_latency_for_every_network_that_keeps_more_channels(resnet20, table):
    _, space = resnet20
    rng = np.random.default_rng(0)
    small = space.kept_batch(rng.uniform(0, 0.7, (200, len(space.groups))))
    larger = np.minimum(small + rng.integers(0, 8, small.shape), [g.units for g in space.groups])
    assert (table.predict(space, larger) >= table.predict(space, small) - 1e-12).all()
    full = space.kept_batch(np.zeros((1, len(space.groups))))
    assert table.predict(space, full)[0] > table.predict(space, small).min()
    assert {t.name for t in table.layers} >= {"conv1", "layer1.0.conv1", "fc"}
    assert len(table.fit_errors) == 5 and table.scale > 0


def test_interpolation_reads_channel_counts_as_the_next_multiple_of_eight_and_is_bilinear():
    space = PruningSpace.from_model(GroupedSE(), torch.zeros(1, 3, 16, 16))
    name, role = next(key for key in space.layer_rows if key[1] == "out")
    layer = LayerTable(name, 64, 64, [8.0, 64.0], [64.0], [[1.0, 8.0]])  # 1 ms at 8 channels, 8 ms at 64
    t = LatencyTable("k", "cpu", 1, 1, 3, 8, [layer])
    sizes = np.array([1.0, 8.0, 9.0, 16.0, 36.0, 64.0, 100.0])
    row = space.layer_rows[(name, role)]
    kept = np.zeros((len(sizes), len(space.groups)))
    gi = int(np.flatnonzero(space._dim_matrix[row])[0])
    kept[:, gi] = (sizes - space._dim_const[row]) / space._dim_matrix[row, gi]
    padded = np.minimum(np.ceil(sizes / 8) * 8, 64)
    assert np.allclose(t.predict(space, kept), 1.0 + 7.0 * (np.clip(padded, 8, 64) - 8) / 56)


def test_the_table_survives_json_and_is_cached_by_device_threads_and_architecture(resnet20, tmp_path):
    model, space = resnet20
    example = torch.zeros(1, 3, 32, 32)
    loose = {"grid": 2, "repeats": 3, "max_fit_error": 10.0}  # the cache is tested here, not the fit
    first, path, built = load_or_build(model, space, example, str(tmp_path), threads=1, **loose)
    again, path2, built2 = load_or_build(model, space, example, str(tmp_path), threads=1, **loose)
    assert built and not built2 and path == path2
    kept = space.kept_batch(np.random.default_rng(1).uniform(0, 0.7, (20, len(space.groups))))
    assert np.array_equal(first.predict(space, kept), again.predict(space, kept))
    _, other, _ = load_or_build(model, space, example, str(tmp_path), threads=2, **loose)
    assert other != path
    assert LatencyTable.from_dict(first.to_dict()) == first


@pytest.mark.parametrize("text, expected", [
    (0.6, Budget("latency", 0.6, False)), ("60%", Budget("latency", 0.6, False)),
    ("12ms", Budget("latency", 12.0, True)), ("2.5 ms", Budget("latency", 2.5, True))])
def test_latency_budgets_are_fractions_percentages_or_milliseconds(text, expected):
    assert parse_budget("search.limits.latency", "latency", text) == expected


def test_count_budgets_take_suffixes():
    assert parse_budget("k", "params", "1.5M") == Budget("params", 1.5e6, True)
    assert parse_budget("k", "flops", 2.1e9) == Budget("flops", 2.1e9, True)
    assert parse_budget("k", "flops", "300k") == Budget("flops", 3e5, True)


@pytest.mark.parametrize("limits, message", [
    ("{latency: 12}", "search.limits.latency: 12 is not a budget; expected a fraction in (0, 1), a percentage "
                      "('60%'), milliseconds ('12ms')"),
    ("{params: 12ms}", "search.limits.params: '12ms' is not a budget"),
    ("{memory: 0.5}", "search.limits.memory: unknown budget 'memory'; allowed: flops, params, latency"),
    ("{flops: 0}", "search.limits.flops: 0 is not a budget")])
def test_a_bad_budget_is_one_line_naming_the_key(limits, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"search.limits={limits}"])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_every_sampled_strategy_meets_the_target_band_and_every_limit(resnet20, table):
    _, space = resnet20
    space.latency = table
    try:
        sampler = StrategySampler(space, 0.7, 0.03, 0.7, seed=3, constraint=CONSTRAINTS["latency"],
                                  limits=[Budget("params", 0.5, False), Budget("flops", 0.6, False)])
        strategies = np.array([sampler.sample(i) for i in range(40)])
        kept = space.kept_batch(strategies)
        assert sampler.feasible(strategies).all()
        assert (CONSTRAINTS["params"].fraction(space, kept) <= 0.5 + 1e-12).all()
        assert (CONSTRAINTS["flops"].fraction(space, kept) <= 0.6 + 1e-12).all()
        latency = CONSTRAINTS["latency"].fraction(space, kept)
        assert ((latency >= 0.67 - 1e-12) & (latency <= 0.73 + 1e-12)).all()
        assert sampler.bound("latency") == pytest.approx(0.73) and sampler.bound("params") == 0.5
        unconstrained = StrategySampler(space, 0.7, 0.03, 0.7, seed=3, constraint=CONSTRAINTS["latency"])
        free = np.array([unconstrained.sample(i) for i in range(40)])
        assert (CONSTRAINTS["params"].fraction(space, space.kept_batch(free)) > 0.5).any()  # the limit did bind
    finally:
        space.latency = None


def test_an_unreachable_limit_is_refused_naming_it(resnet20):
    _, space = resnet20
    with pytest.raises(SpaceError, match=r"^search.limits.params: 0.0100 of the unpruned network is not reachable"):
        StrategySampler(space, 0.5, 0.02, 0.7, limits=[Budget("params", 0.01, False)])


def test_a_latency_budget_without_a_table_says_what_is_missing(resnet20):
    _, space = resnet20
    with pytest.raises(SpaceError, match="latency budget needs the space's latency table"):
        StrategySampler(space, 0.5, 0.02, 0.7, constraint=CONSTRAINTS["latency"])


def test_a_candidate_timed_over_the_budget_is_stored_but_never_a_finalist(resnet20, table):
    _, space = resnet20
    space.latency = table
    try:
        slow = CandidateRecord(0, [0.1], score=0.9, flops=1, latency_ms=10.0 * (1 + table.worst_error) + 0.01)
        fast = CandidateRecord(1, [0.1], score=0.5, flops=1, latency_ms=9.0)
        for record in (slow, fast):
            check_latency(record, 10.0, space)
        assert slow.within_budget is False and "over the latency budget" in slow.warning
        assert fast.within_budget is True and fast.warning is None
        assert best([slow, fast], 2) == [fast]
    finally:
        space.latency = None


def test_a_load_that_slows_the_base_beside_a_candidate_moves_its_budget_alike(resnet20, table):
    """A candidate over its budget is judged again against the base timed now: a machine twice as slow as when the
    table was built keeps a candidate twice as slow in its budget, and one that is slow by itself (the base at the
    table's speed) out; a candidate within its budget is not timed again."""
    _, space = resnet20
    space.latency = table

    def never() -> float:
        raise AssertionError("a candidate within its budget timed the base")

    try:
        over = 10.0 * (1 + table.worst_error) + 0.01  # over the budget at the table's speed
        loaded = CandidateRecord(0, [0.1], score=0.9, flops=1, latency_ms=2 * over - 0.02)
        alone = CandidateRecord(1, [0.1], score=0.9, flops=1, latency_ms=over)
        within = CandidateRecord(2, [0.1], score=0.9, flops=1, latency_ms=9.0)
        check_latency(loaded, 10.0, space, lambda: 2 * table.base_ms)
        check_latency(alone, 10.0, space, lambda: table.base_ms)
        check_latency(within, 10.0, space, never)
        assert loaded.within_budget is True and loaded.warning is None
        assert alone.within_budget is False and "the base timed" not in alone.warning
        assert within.within_budget is True
    finally:
        space.latency = None


def test_a_search_whose_every_candidate_was_timed_over_its_budget_stops_in_one_line(resnet20, table):
    """Nothing to fine-tune: the search stage stops naming why, instead of handing Tune an empty stage."""
    from prunetune.search.stages import failure_verdict

    _, space = resnet20
    space.latency = table
    cfg = load_config(None, [])
    try:
        records = [CandidateRecord(i, [0.1], score=0.5, flops=1, latency_ms=99.0) for i in range(3)]
        for r in records:
            check_latency(r, 10.0, space)
        verdict = failure_verdict(records, cfg)
        assert verdict.startswith("search stopped: none of the 3 candidates can be fine-tuned: 3 were timed over "
                                  "their latency budget (timed at 99.00 ms") and "\n" not in verdict
        check_latency(records[0], 1000.0, space)
        assert failure_verdict(records, cfg) is None
    finally:
        space.latency = None


def test_inspect_latency_shows_the_shares_before_refusing_an_unreachable_target(tmp_path, capsys, monkeypatch):
    from prunetune.search.cli import main

    monkeypatch.setattr(timing, "time_forward", _modelled_time)  # a table as the machine's load never makes it
    code = main(["inspect", "--latency", "--set", "search.constraint=latency", "--set", "search.target=0.05",
                 "--set", "latency.grid=3", "--set", "latency.repeats=3", "--set", "latency.max_fit_error=10",
                 "--set", f"output.cache_dir={tmp_path}",
                 "--set", f"output.dir={tmp_path / 'run'}"])
    out, err = capsys.readouterr()
    assert code == 2 and "latency share" in out and "features.0" in out
    assert "search.target: latency 0.05 +- 0.02 is not reachable" in err and len(err.strip().splitlines()) <= 2


def test_inspect_latency_names_each_layer_whose_kept_count_misses_the_kernels_width(tmp_path, capsys, monkeypatch):
    from prunetune.search.cli import main

    monkeypatch.setattr(timing, "time_forward", _modelled_time)  # the same table on every machine
    shown = {}
    for round_to in (1, 8):  # digits at 50% of the FLOPs keeps 22 of 32 and 45 of 64 channels; rounded: 8, 16, ...
        code = main(["inspect", "--latency", "--set", "latency.grid=2", "--set", "latency.repeats=3",
                     "--set", "latency.max_fit_error=10", "--set", f"output.cache_dir={tmp_path}",
                     "--set", f"output.dir={tmp_path / 'run'}", "--set", f"search.round_to={round_to}"])
        out = capsys.readouterr().out
        assert code == 0 and "where the time goes at search.target=0.5 (flops): " in out
        rows = re.findall(r"^\| (\S+) \| (\d+)/(\d+), (\d+)/(\d+) \| [\d.]+ \| [\d.]+ \| (.*) \|$", out, re.M)
        assert {r[0] for r in rows} == {"features.0", "features.1", "features.3", "features.4", "features.6",
                                        "features.7", "features.9", "features.10", "fc"}  # every layer, before/after
        shown[round_to] = out
        for name, out_kept, out_full, in_kept, in_full, why in rows:
            misaligned = [k for k, full in ((int(out_kept), int(out_full)), (int(in_kept), int(in_full)))
                          if k < full and k % 8]
            runs = ", ".join(str(-(-k // 8) * 8) for k in misaligned)
            assert (why.startswith(f"{', '.join(map(str, misaligned))} run") and why.endswith(f" as {runs}")
                    if misaligned else " as " not in why), (name, why)
    assert re.search(r"^\| \S+ \| \d+/\d+, \d+/\d+ \| [\d.]+ \| [\d.]+ \| \d+(, \d+)? runs? as ", shown[1], re.M)
    assert "set search.round_to=8 so that what is pruned is also faster" in shown[1]
    assert " runs as " not in shown[8] and "search.round_to=8 so that" not in shown[8]


def _noisy_time(model, example, repeats=30, warmup=5, threads=None, runtime="torch") -> Timing:
    """Modelled timings with a load spike on every other call: a table that cannot fit them."""
    _noisy_time.calls += 1
    modelled = _modelled_time(model, example, repeats, warmup, threads)
    return Timing(modelled.median_ms * (1 + 3 * (_noisy_time.calls % 2)), 0.0, repeats)


def test_a_table_over_the_fit_error_bound_is_timed_again_then_refused_and_never_cached_nor_read(resnet20, tmp_path,
                                                                                                monkeypatch):
    model, space = resnet20
    example, small = torch.zeros(1, 3, 32, 32), {"threads": 1, "grid": 2, "repeats": 3}
    _noisy_time.calls = 0
    monkeypatch.setattr(timing, "time_forward", _noisy_time)
    with pytest.raises(latency.UnreliableTable, match=r"^latency: the table's fit misses its own networks by up to "
                       r"[\d.]+% \(first [\d.]+%, then with 6 passes per figure\), over latency.max_fit_error=0.15: "):
        load_or_build(model, space, example, str(tmp_path), **small)
    assert not (tmp_path / "latency").exists() or not list((tmp_path / "latency").iterdir())
    monkeypatch.setattr(timing, "time_forward", _modelled_time)  # a quiet machine: the table fits, and is cached
    table, path, built = load_or_build(model, space, example, str(tmp_path), **small)
    assert built and table.worst_error <= 0.15 and read_table(path, table.key) == table
    bad = {**table.to_dict(), "fit_errors": [0.0, 0.4]}  # a table cached before the bound existed, or by hand
    write_json(path, bad)
    assert read_table(path, table.key) is None
    again, _, rebuilt = load_or_build(model, space, example, str(tmp_path), **small)
    assert rebuilt and again.worst_error <= 0.15


def test_where_the_time_went_names_a_layer_whose_kept_count_misses_the_kernels_width(resnet20, table):
    _, space = resnet20
    full = space.kept_batch(np.zeros((1, len(space.groups))))[0]
    g = next(i for i, grp in enumerate(space.groups) if grp.units == 16)
    aligned, misaligned = full.copy(), full.copy()
    aligned[g], misaligned[g] = 8, 13
    costs = latency.where_time_went(table, space, misaligned)
    assert sum(c.pruned_ms for c in costs) + table.intercept_ms == pytest.approx(table.predict(space, misaligned)[0])
    named = [c for c in costs if c.why == "13 runs as 16"]
    assert named and all(c.misaligned and 13 in c.channels for c in named)
    shown = latency.describe_costs(costs, table.multiple, limit=len(costs))
    assert all(f"| {c.name} |" in shown for c in named) and "set search.round_to=8 so that" in shown
    assert not any(c.misaligned for c in latency.where_time_went(table, space, aligned))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_table_timed_in_an_onnx_runtime_times_layers_networks_and_candidates_there(runtime, tmp_path):
    pytest.importorskip(runtime)  # openvino is an extra of its own, not the test extra's
    model = GroupedSE().eval()
    example = torch.zeros(1, 3, 16, 16)
    space = PruningSpace.from_model(model, example)
    loose = {"threads": 1, "grid": 2, "repeats": 3, "max_fit_error": 10.0}  # what is tested is where it is timed
    table, _, built = load_or_build(model, space, example, str(tmp_path), runtime=runtime, **loose)
    assert built and table.runtime == runtime and LatencyTable.from_dict(table.to_dict()) == table
    torch_table, _, _ = load_or_build(model, space, example, str(tmp_path), **loose)
    assert torch_table.runtime == "torch" and torch_table.key != table.key  # one cache entry per runtime
    pruned = build_model("digits_cnn", 10, 3).eval()
    before = len(timing._SESSIONS)
    assert table.time(pruned, torch.device("cpu"), (3, 16, 16)).median_ms > 0
    assert pruned in timing._SESSIONS and len(timing._SESSIONS) == before + 1  # exported and run by the runtime
    assert [key[0] for key in timing._SESSIONS[pruned]] == [runtime]
    torch_table.time(pruned, torch.device("cpu"), (3, 16, 16))
    assert len(timing._SESSIONS[pruned]) == 1  # eager PyTorch exports nothing


def test_a_runtime_that_is_not_installed_or_not_on_the_device_is_refused_before_anything_is_timed(monkeypatch,
                                                                                                   tmp_path):
    from prunetune.search.prepare import prepare
    absent = timing.Runtime("nosuchruntime", timing.RUNTIMES["torch"].call, lambda: "0", "No Such", cpu_only=True,
                            package="nosuchruntime (pip install nosuchruntime)")
    monkeypatch.setitem(timing.RUNTIMES, "nosuchruntime", absent)
    with pytest.raises(ConfigError, match=r"^latency.runtime: nosuchruntime is not installed; install nosuchruntime "
                                          r"\(pip install nosuchruntime\)$"):
        load_config(None, ["latency.runtime=nosuchruntime", "search.constraint=latency"])
    with pytest.raises(ConfigError, match=r"^latency.runtime: onnxruntime times on the CPU here; set latency.device"):
        load_config(None, ["latency.runtime=onnxruntime", "search.constraint=latency", "latency.device=cuda"])
    assert load_config(None, ["latency.runtime=nosuchruntime"]).latency.runtime == "nosuchruntime"  # no latency budget
    found = importlib.util.find_spec  # openvino absent, as where only the test extra is installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else found(name, *a))
    missing = r"^latency.runtime: openvino is not installed; install openvino \(pip install 'prunetune\[openvino\]'\)$"
    with pytest.raises(ConfigError, match=missing):
        load_config(None, ["latency.runtime=openvino", "search.constraint=latency"])
    flops = load_config(None, ["latency.runtime=openvino", f"output.dir={tmp_path / 'run'}",
                               f"output.cache_dir={tmp_path}"])  # a FLOPs budget: the final models are timed in it
    with pytest.raises(ConfigError, match=missing):
        prepare(flops)


@pytest.mark.parametrize("overrides, expected", [
    (["search.constraint=latency", "latency.runtime=onnxruntime"], 8),  # its kernels' block: the table can predict it
    (["search.constraint=latency", "latency.runtime=openvino"], 8),
    (["search.constraint=flops", "search.limits={latency: 0.8}", "latency.runtime=onnxruntime"], 8),
    (["search.constraint=latency", "latency.runtime=onnxruntime", "search.round_to=1"], 1),  # the user's choice
    (["search.constraint=latency"], 1),  # eager PyTorch: counts between blocks cost what the table says
    (["latency.runtime=onnxruntime"], 1)])  # no latency budget: nothing to predict
def test_round_to_defaults_to_the_runtimes_channel_block_for_a_latency_budget_timed_in_it(overrides, expected,
                                                                                          monkeypatch):
    from prunetune.search import config

    monkeypatch.setattr(config, "check_runtime", lambda cfg: None)  # openvino is an extra of its own
    assert load_config(None, overrides).search.round_to == expected


def test_interleaved_timing_times_every_run_in_each_round_and_keeps_the_median_of_the_rounds(monkeypatch):
    order = []
    per_model = {"a": iter([5.0, 1.0, 1.0, 9.0, 1.0]), "b": iter([2.0, 2.0, 7.0, 2.0, 2.0])}

    def timed(model, example, repeats, warmup, threads, runtime):
        order.append((model, repeats, warmup))
        return Timing(next(per_model[model]), 0.5, repeats)

    monkeypatch.setattr(timing, "time_forward", timed)
    a, b = timing.interleaved([("a", None), ("b", None)], repeats=12, threads=1)
    assert order == [("a", 3, 1), ("b", 3, 1)] * timing.ROUNDS  # round by round, each run a share of the passes
    assert (a.median_ms, b.median_ms, a.iqr_ms, a.repeats) == (1.0, 2.0, 0.5, 15)  # the spikes (5, 9, 7) are outvoted
