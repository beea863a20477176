"""The accuracy-vs-cost front from one search: search.target as a range or a list of budgets, the sampler's bands,
baselines and finalists per budget, the report's front and `export --point/--budget`."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from prunetune import CONSTRAINTS, PruningSpace, StrategySampler, build_model, load_config, load_pruned
from prunetune.search.algorithms import ALGORITHMS, RandomSearch
from prunetune.search.baselines import BASELINES, baselines
from prunetune.search.cli import main
from prunetune.search.config import ConfigError, config_warnings
from prunetune.search.front import finalists, point_rank
from prunetune.search.prepare import prepare
from prunetune.search.rankings import rankings
from prunetune.search.runfiles import Front, FrontCost, FrontPoint, Summary
from prunetune.search.sampler import budget_bands
from prunetune.search.store import CandidateStore
from prunetune.search.tune_search import StrategySearcher
from prunetune.workers.groups import SpaceError
from prunetune.workers.record import CandidateRecord, best
from prunetune.workers.space import count_flops
from tests import summaries
from tests.runs import as_args, small

RANGE = "search.target=[0.3, 0.7]"


@pytest.fixture(scope="module")
def space():
    return PruningSpace.from_model(build_model("resnet20", 10), torch.zeros(1, 3, 32, 32))


def test_a_range_is_split_into_evenly_spaced_budgets_whose_bands_tile_it():
    assert budget_bands([0.3, 0.7], 0.02, 5) == [(0.3, 0.05), (0.4, 0.05), (0.5, 0.05), (0.6, 0.05), (0.7, 0.05)]
    assert budget_bands([0.3, 0.5, 0.7], 0.02) == [(0.3, 0.02), (0.5, 0.02), (0.7, 0.02)]
    assert budget_bands(0.5, 0.02) == [(0.5, 0.02)]
    cfg = load_config(None, [RANGE, "search.front_points=3"])
    assert cfg.search.target == [0.3, 0.7] and cfg.search.front_points == 3
    assert load_config(None, ["search.target=0.4"]).search.target == 0.4  # one budget: a float, as ever


def test_asha_over_a_front_is_warned_of():
    warned = config_warnings(load_config(None, [RANGE]))
    assert len(warned) == 1 and warned[0].startswith("search.target is a front of budgets and finetune.scheduler is "
                                                     "asha")
    assert config_warnings(load_config(None, [RANGE, "finetune.scheduler=fifo"])) == []
    assert config_warnings(load_config(None, [])) == []


def test_a_range_spreads_the_candidates_evenly_over_its_budgets(space):
    sampler = StrategySampler(space, [0.3, 0.7], 0.02, 0.7, seed=0)
    strategies = np.array([sampler.sample(i) for i in range(100)])
    fractions = space.flops_of_kept(space.kept_batch(strategies)) / space.base_flops
    assert sampler.feasible(strategies).all() and (fractions >= 0.25 - 1e-12).all() and (fractions <= 0.75).all()
    counts = np.bincount(sampler.budget_of(strategies), minlength=5)
    assert counts.min() >= 10, counts  # 20 each on average
    u = np.random.default_rng(0).random(len(space.groups))
    for band in range(5):  # level v of the cube: budget int(5 v), and back
        ratios = sampler.strategy(u, (band + 0.5) / 5)
        assert ratios is not None and sampler.budget_of(ratios[None])[0] == band
        assert band / 5 <= sampler.position(ratios)[1] <= (band + 1) / 5


def test_every_candidate_of_a_list_is_checked_against_its_own_budget(space, tmp_path):
    sampler = StrategySampler(space, [0.3, 0.5, 0.7], 0.02, 0.7, seed=1, constraint=CONSTRAINTS["params"])
    strategies = np.array([sampler.sample(i) for i in range(30)])
    fractions = space.params_of_kept(space.kept_batch(strategies)) / space.base_params
    nearest = np.array([0.3, 0.5, 0.7])[np.abs(fractions[:, None] - [0.3, 0.5, 0.7]).argmin(axis=1)]
    assert (np.abs(fractions - nearest) <= 0.02 + 1e-12).all() and len(set(nearest)) == 3
    assert [sampler.bound("params", r) for r in strategies] == pytest.approx(nearest + 0.02)
    assert sampler.bound("params") == pytest.approx(0.72) and sampler.bound("flops") is None
    searcher = StrategySearcher(RandomSearch(sampler), "random", [], 6, CandidateStore(str(tmp_path)), batch_size=6,
                                latency_budget=lambda ratios: 100 * sampler.bound("params", ratios))
    handed = searcher.suggest("t0")["candidates"]
    assert [c.latency_budget_ms for c in handed] == pytest.approx([100 * sampler.bound("params", c.ratios)
                                                                   for c in handed])
    assert len({round(c.latency_budget_ms, 6) for c in handed}) > 1  # not one budget for all


@pytest.mark.parametrize("name", ["evolution", "tpe"])
def test_a_learning_search_improves_every_budget_of_a_front(space, name):
    """Scores that rise with the budget would draw one search over the whole range to its top budget; each budget
    is searched apart, from its own records, and resumes exactly."""
    sampler = StrategySampler(space, [0.3, 0.7], 0.02, 0.7, seed=3)

    def run(algorithm, start, stop, proposals):
        for i in range(start, stop):
            ratios = proposals[i] if i < len(proposals) else algorithm.propose(i)
            proposals[i:i + 1] = [ratios]
            algorithm.observe(CandidateRecord(i, ratios, score=space.flops(ratios) / space.base_flops, flops=1))
        return proposals

    proposals = run(ALGORITHMS[name](sampler, population=4), 0, 40, [])
    assert all(sampler.contains(r) for r in proposals) and len({tuple(r) for r in proposals}) == 40
    assert sampler.budget_of(np.array(proposals)).tolist() == [i % 5 for i in range(40)]
    resumed = ALGORITHMS[name](sampler, population=4)
    assert run(resumed, 0, 40, proposals[:24]) == proposals  # the first 24 replayed, the rest proposed again


def test_an_unreachable_budget_of_a_front_is_named(space):
    with pytest.raises(SpaceError, match=r"^search.target: flops 0.05 \+- 0.02 is not reachable"):
        StrategySampler(space, [0.05, 0.5, 0.7], 0.02, 0.3)


def test_the_baselines_are_proposed_at_every_budget(tmp_path):
    prep = prepare(load_config(None, small(tmp_path / "run", tmp_path / "cache", RANGE)))
    found = baselines(prep.sampler, rankings(prep, BASELINES))
    assert [name for name, _ in found[:10]] == ["uniform"] * 5 + ["global threshold"] * 5
    assert all(prep.sampler.contains(ratios) for _, ratios in found)
    uniform = np.array([ratios for name, ratios in found if name == "uniform"])
    assert prep.sampler.budget_of(uniform).tolist() == [0, 1, 2, 3, 4]


def test_the_finalists_are_the_best_of_each_budget(space):
    sampler = StrategySampler(space, [0.3, 0.7], 0.02, 0.7, seed=2)
    scores = np.random.default_rng(0).random(40)
    records = [CandidateRecord(i, sampler.sample(i), score=float(s), flops=1) for i, s in enumerate(scores)]
    chosen = finalists(sampler, records, 2)
    where = dict(zip(range(40), sampler.budget_of(np.array([r.ratios for r in records]))))
    assert len(chosen) == 10 and chosen == best(chosen, 10)  # best first over all budgets
    for band in range(5):
        mine = [r for r in records if where[r.index] == band]
        assert [r.index for r in chosen if where[r.index] == band] == [r.index for r in best(mine, 2)]
    one = StrategySampler(space, 0.5, 0.3, 0.7, seed=2)
    assert finalists(one, records, 3) == best(records, 3)  # one budget: the k best, as ever


def test_the_finalists_are_different_networks(space):
    one = StrategySampler(space, 0.5, 0.3, 0.7, seed=2)
    kept = [[8, 16], [8, 16], [16, 16], [8, 24]]  # ratios that round alike keep the same channels: one network
    records = [CandidateRecord(i, one.sample(i), score=1 - i / 10, flops=1, kept_units=k) for i, k in enumerate(kept)]
    assert [r.index for r in finalists(one, records, 3)] == [0, 2, 3]
    assert [r.index for r in finalists(one, records, 2)] == [0, 2]


def test_a_point_without_a_model_or_a_run_without_a_front_is_refused_in_one_line():
    points = [FrontPoint(point=1, budget=0.3, tolerance=0.05, band=[0.25, 0.35], candidate=4),
              FrontPoint(point=2, budget=0.5, tolerance=0.05, band=[0.45, 0.55], candidate=None),
              FrontPoint(point=3, budget=0.7, tolerance=0.05, band=[0.65, 0.75], candidate=9, rank=2)]
    front_summary = summaries.summary([], front=Front(constraint="flops", points=points))
    summary = Summary.from_json(front_summary.to_json())  # as a run's summary.json reads back
    assert summary == front_summary
    assert point_rank(summary, 3, None) == point_rank(summary, None, 0.7) == 2
    for args, message in [((1, None), "--point: point 1 (budget 0.3) has no model; its candidate 4 has no fine-tuned"),
                          ((None, 0.5), "--budget: point 2 (budget 0.5) has no model; no candidate landed"),
                          ((4, None), "--point: 4 is not a point of the front; it has points 1 to 3"),
                          ((None, 0.4), "--budget: 0.4 is not a budget of the front; its budgets are 0.3, 0.5, 0.7")]:
        with pytest.raises(ConfigError) as e:
            point_rank(summary, *args)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="^--point: the run has no front"):
        point_rank(summaries.summary([]), 1, None)


@pytest.fixture(scope="module")
def front_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("front")
    assert main(["run", *as_args(small(tmp / "run", tmp / "cache", RANGE, candidates=12, top_k=1))]) == 0
    return tmp / "run"


@pytest.mark.ray
@pytest.mark.slow
def test_a_range_yields_a_front_of_five_budgets_in_the_report(front_run):
    summary = json.load(open(front_run / "final" / "summary.json"))
    points = summary["front"]["points"]
    assert [p["budget"] for p in points] == [0.3, 0.4, 0.5, 0.6, 0.7]
    assert all(p["band"][0] <= p["flops_ratio"] <= p["band"][1] and p["rank"] for p in points)
    records = CandidateStore(str(front_run)).records()
    assert [r.source for r in sorted(records, key=lambda r: r.index)][:5] == ["uniform"] * 5
    assert len(summary["final"]) == 5 and {f["candidate"] for f in summary["final"]} == {p["candidate"]
                                                                                         for p in points}
    for p in points:  # top_k 1 per budget: each point is its budget's best candidate
        mine = [r for r in records if p["band"][0] <= r.flops_ratio <= p["band"][1]]
        assert best(mine, 1)[0].index == p["candidate"] and p["baselines"]["uniform"]["score"] <= p["score"]
    report = (front_run / "report.md").read_text()
    assert "## The accuracy-vs-cost front" in report and (front_run / "report-front.png").stat().st_size > 1000
    for p in points:
        assert (f"| {p['point']} | {100 * p['budget']:.2f}% | {p['candidate']} | {p['source']} | {p['score']:.4f} | "
                f"{p['flops'] / 1e6:.2f} M ({100 * p['flops_ratio']:.2f}%) |") in report
    assert "report-front.png" in json.load(open(front_run / "manifest.json"))["files"]


@pytest.mark.ray
@pytest.mark.slow
def test_every_point_exports_with_the_report_s_figures(front_run, capsys, tmp_path):
    points = json.load(open(front_run / "final" / "summary.json"))["front"]["points"]
    for p in points:
        target = tmp_path / f"point{p['point']}.pt"
        assert main(["export", str(front_run), "--point", str(p["point"]), "--to", str(target)]) == 0
        model, record, metrics = load_pruned(str(target), raw_input=False)
        assert record.flops == p["flops"] == count_flops(model, torch.zeros(1, 1, 8, 8)).total()
        assert record.params == p["params"] == sum(t.numel() for t in model.parameters())
        assert metrics.adaptive_bn_score == p["score"] and metrics.candidate == p["candidate"]
    capsys.readouterr()
    assert main(["export", str(front_run), "--budget", "0.5"]) == 0
    assert capsys.readouterr().out.strip() == points[2]["path"]
    assert main(["export", str(front_run), "--budget", "0.45"]) == 2
    assert "--budget: 0.45 is not a budget of the front" in capsys.readouterr().err
    pytest.importorskip("onnxruntime")
    fp32 = points[1]["path"]  # a point's int8 model: calibrated and written beside that point's model file
    assert main(["export", str(front_run), "--point", "2", "--quantize", "int8", "--max-accuracy-drop", "100"]) == 0
    assert f"written to {fp32[:-len('.pt')]}.int8.onnx" in capsys.readouterr().out


def test_the_front_table_has_a_latency_column_when_a_table_is_in_use_and_a_row_per_budget():
    from prunetune.search.report import front_figure, front_table

    rule = FrontCost(candidate=0, source="uniform", score=0.5, flops=300, flops_ratio=0.3, params=30,
                     params_ratio=0.3, latency_predicted_ms=0.8, latency_ratio=0.4)
    points = [FrontPoint(**{**dataclasses.asdict(rule), "candidate": 7, "source": "tpe", "score": 0.6}, point=1,
                         budget=0.3, tolerance=0.05, band=[0.25, 0.35], rank=2, path="final/rank2.pt", val=0.7,
                         test=0.71, baselines={"uniform": rule}),
              FrontPoint(point=2, budget=0.7, tolerance=0.05, band=[0.65, 0.75], candidate=None)]
    summary = summaries.summary([], front=Front(constraint="latency", points=points))
    summary.base = dataclasses.replace(summary.base, flops=1000, params=100, score=0.9, test=0.95,
                                       latency_predicted_ms=2.0)
    rows = front_table(summary).splitlines()
    assert "predicted latency" in rows[0] and len({row.count("|") for row in rows}) == 1  # every row 13 cells
    assert rows[3].startswith("| 1 | 30.00% | 7 | tpe | 0.6000 | 0.00 M (30.00%) | 0.000 M (30.00%) | 0.8 ms (40.00%) "
                              "| rank2.pt | 70.00% | 71.00% | uniform 0.5000 |")
    assert "no candidate in this budget" in rows[4]
    records = [CandidateRecord(0, [0.5], score=0.5, flops=300, params=30, latency_predicted_ms=0.8)]
    figure = front_figure(records, summary)
    assert len(figure.axes) == 3  # FLOPs, params and predicted latency
    figure.clf()
