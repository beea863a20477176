"""The search algorithms and the baselines, without Ray: every proposal inside the budget, a resumed search that
continues exactly, proposals that differ while candidates are in flight, baselines that mean what they say."""
import numpy as np
import pytest
import torch

from prunetune import PruningSpace, StrategySampler, build_model
from prunetune.search.algorithms import ALGORITHMS
from prunetune.search.baselines import global_threshold, uniform
from prunetune.workers.prune import position_importance
from prunetune.workers.record import CandidateRecord
from tests.archs import randomize_batchnorm


@pytest.fixture(scope="module")
def sampler():
    space = PruningSpace.from_model(build_model("resnet20", 10), torch.zeros(1, 3, 32, 32))
    return StrategySampler(space, 0.5, 0.01, 0.7, seed=3)


def _score(ratios) -> float:
    """A made-up objective with an optimum inside the space: prune the early groups less, the late ones more."""
    r = np.asarray(ratios)
    return float(-np.abs(r - np.linspace(0.1, 0.6, len(r))).mean())


def _run(algorithm, start: int, stop: int) -> list[list[float]]:
    proposals = []
    for i in range(start, stop):
        ratios = algorithm.propose(i)
        proposals.append(ratios)
        algorithm.observe(CandidateRecord(i, ratios, score=_score(ratios), flops=1))
    return proposals


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_proposal_is_inside_the_budget(sampler, name):
    proposals = _run(ALGORITHMS[name](sampler, population=8), 0, 40)
    assert all(sampler.contains(r) and max(r) <= sampler.max_ratio for r in proposals)
    assert len({tuple(r) for r in proposals}) == 40


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_resumed_serial_search_continues_exactly(sampler, name):
    uninterrupted = _run(ALGORITHMS[name](sampler, population=8), 0, 24)
    first = ALGORITHMS[name](sampler, population=8)
    _run(first, 0, 12)
    resumed = ALGORITHMS[name](sampler, population=8)  # the driver died: a new object, the store replayed
    for i, ratios in enumerate(uninterrupted[:12]):
        resumed.observe(CandidateRecord(i, ratios, score=_score(ratios), flops=1))
    assert _run(resumed, 12, 24) == uninterrupted[12:]


def _run_batched(algorithm, start: int, stop: int, batch: int) -> list[list[float]]:
    """A serial search that hands out batches of consecutive candidates (as the searcher does): each batch is
    proposed at once, from the records before its first number, then evaluated."""
    proposals = []
    while start < stop:
        horizon = start // batch * batch
        ratios = [algorithm.propose(i, horizon) for i in range(start, min(horizon + batch, stop))]
        for i, r in enumerate(ratios, start):
            algorithm.observe(CandidateRecord(i, r, score=_score(r), flops=1))
        proposals += ratios
        start += len(ratios)
    return proposals


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_batched_search_resumed_in_the_middle_of_a_batch_continues_exactly(sampler, name):
    uninterrupted = _run_batched(ALGORITHMS[name](sampler, population=8), 0, 32, batch=8)
    resumed = ALGORITHMS[name](sampler, population=8)  # killed with 13 stored: candidates 13-15 of batch 8-15 lost
    for i, ratios in enumerate(uninterrupted[:13]):
        resumed.observe(CandidateRecord(i, ratios, score=_score(ratios), flops=1))
    assert _run_batched(resumed, 13, 32, batch=8) == uninterrupted[13:]
    assert uninterrupted[16:24] != _run(ALGORITHMS[name](sampler, population=8), 0, 24)[16:] or name == "random"


@pytest.mark.parametrize("name", ["evolution", "tpe"])
def test_learning_algorithms_propose_from_the_scores_and_differ_while_candidates_are_in_flight(sampler, name):
    algorithm = ALGORITHMS[name](sampler, population=8)
    _run(algorithm, 0, 8)
    in_flight = [algorithm.propose(i) for i in range(8, 12)]  # four trials at once, none finished yet
    assert len({tuple(r) for r in in_flight}) == 4
    assert all(r != sampler.sample(i) for i, r in zip(range(8, 12), in_flight))  # not the random draws


def test_the_uniform_baseline_prunes_every_group_alike_inside_the_band(sampler):
    ratios = uniform(sampler)
    assert len(set(ratios)) == 1 and sampler.contains(ratios)


@pytest.mark.parametrize("criterion", ["l1", "bn_scale"])
def test_the_global_threshold_keeps_every_channel_above_one_threshold(criterion):
    model = randomize_batchnorm(build_model("vgg16_bn", 10))
    space = PruningSpace.from_model(model, torch.zeros(1, 3, 32, 32))
    sampler = StrategySampler(space, 0.5, 0.02, 0.9)
    importance = position_importance(model, space, criterion)
    ratios = global_threshold(sampler, importance, comparable=criterion == "bn_scale")
    assert sampler.contains(ratios)
    scaled = importance if criterion == "bn_scale" else [imp / imp.mean() for imp in importance]
    kept, pruned = [], []
    for imp, k in zip(scaled, space.kept_units(ratios)):
        order = np.sort(imp)[::-1]
        if len(imp) - k < int(len(imp) * 0.9):  # a group at max_ratio keeps more than the threshold says
            kept.append(order[k - 1])
            pruned.append(order[k] if k < len(imp) else -np.inf)
    assert min(kept) >= max(pruned)  # one threshold separates what every group keeps from what it prunes
