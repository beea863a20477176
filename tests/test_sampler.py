"""The FLOPs-constrained sampler: valid, deterministic by index, broad."""
import numpy as np
import pytest
import torch

from prunetune import CONSTRAINTS, PruningSpace, StrategySampler, build_model
from prunetune.workers.groups import SpaceError
from tests.archs import resnet50


@pytest.fixture(scope="module")
def space():
    return PruningSpace.from_model(build_model("resnet20", 10), torch.zeros(1, 3, 32, 32))


def test_every_sample_is_inside_the_band(space):
    sampler = StrategySampler(space, 0.5, 0.01, 0.7, seed=0)
    for i in range(200):
        ratios = sampler.sample(i)
        assert len(ratios) == len(space.groups)
        assert all(0 <= r <= 0.7 for r in ratios)
        assert abs(space.flops(ratios) / space.base_flops - 0.5) <= 0.01


def test_indexable_and_seeded(space):
    a = StrategySampler(space, 0.5, 0.01, 0.7, seed=3)
    b = StrategySampler(space, 0.5, 0.01, 0.7, seed=3)
    assert a.sample(17) == b.sample(17)
    assert [a.sample(i) for i in (5, 2, 9)] == [b.sample(i) for i in (5, 2, 9)]  # order does not matter
    assert a.sample(17) != a.sample(18)
    assert a.sample(17) != StrategySampler(space, 0.5, 0.01, 0.7, seed=4).sample(17)


def test_ratios_spread_across_their_range_not_uniform_pruning(space):
    sampler = StrategySampler(space, 0.5, 0.01, 0.7, seed=0)
    r = np.array([sampler.sample(i) for i in range(300)])
    per_group = r.std(axis=0)  # across candidates, each group's ratio should vary widely
    within = r.std(axis=1)  # within a candidate, groups should not all share one ratio
    assert per_group.min() > 0.1, per_group
    assert np.median(within) > 0.1
    for g in range(r.shape[1]):  # each group reaches both ends of [0, max_ratio]
        assert r[:, g].min() < 0.15 and r[:, g].max() > 0.55


def test_many_groups_tight_band():
    model = resnet50(num_classes=10)
    space = PruningSpace.from_model(model, torch.zeros(1, 3, 64, 64))
    sampler = StrategySampler(space, 0.5, 0.005, 0.7, seed=1)
    fractions = [space.flops(sampler.sample(i)) / space.base_flops for i in range(50)]
    assert all(abs(f - 0.5) <= 0.005 for f in fractions)
    assert len(space.groups) > 30


def test_a_params_budget_keeps_every_sample_inside_the_params_band(space):
    sampler = StrategySampler(space, 0.4, 0.01, 0.7, seed=0, constraint=CONSTRAINTS["params"])
    fractions = [space.params(sampler.sample(i)) / space.base_params for i in range(50)]
    assert all(abs(f - 0.4) <= 0.01 for f in fractions)
    flops = [space.flops(sampler.sample(i)) / space.base_flops for i in range(50)]
    assert max(flops) - min(flops) > 0.05  # FLOPs are free to vary: the budget is on params


def test_infeasible_target_says_the_reachable_range(space):
    lowest = space.flops(np.full(len(space.groups), 0.3)) / space.base_flops
    with pytest.raises(SpaceError) as e:
        StrategySampler(space, 0.2, 0.01, 0.3)
    assert "search.target" in str(e.value) and f"reachable flops range is [{lowest:.4f}, 1.0000]" in str(e.value)
    with pytest.raises(SpaceError, match="search.max_ratio"):
        StrategySampler(space, 0.5, 0.01, 1.0)
    with pytest.raises(SpaceError, match="search.tolerance"):
        StrategySampler(space, 0.5, 0.0, 0.7)
