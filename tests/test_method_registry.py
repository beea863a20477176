"""A pruning method is one module and one registry line: a toy method added to METHODS alone runs end to end."""
from __future__ import annotations

import json

import pytest
import ray
import torch.nn as nn

from prunetune import load_pruned
from prunetune.search.cli import main
from prunetune.search.config import ConfigError, load_config
from prunetune.search.store import CandidateStore
from prunetune.workers.methods import METHODS
from tests.runs import run_args
from tests.toy_method import KeepStem


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, KeepStem.name, KeepStem())


@pytest.mark.ray
@pytest.mark.slow
def test_a_method_added_to_the_registry_alone_is_searched_fine_tuned_and_saved(registered, tmp_path):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(run_args(tmp_path, "search.granularity=keep-stem", candidates=3, top_k=1)) == 0
    finally:
        ray.shutdown()
    records = CandidateStore(str(tmp_path / "run")).records()
    assert len(records) == 3 and all(r.ok for r in records)
    model, record, _ = load_pruned(str(tmp_path / "run" / "final" / "rank1.pt"), raw_input=False)
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert record.granularity == "keep-stem" and stem.out_channels == 32  # digits_cnn's stem, never pruned
    assert json.load(open(tmp_path / "run" / "final" / "summary.json"))["granularity"] == "keep-stem"


def test_what_a_registered_method_cannot_do_is_refused_from_its_declaration(registered):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["search.granularity=keep-stem", "search.criterion=random"])
    assert str(e.value) == ("search.criterion: random ranks other units; stem-preserving channel pruning ranks "
                            "channels: use l1 (magnitude) or l2")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["search.granularity=keep-stem", "search.constraint=latency"])
    assert str(e.value).startswith("search.constraint: latency budgets need channel pruning")
