"""Shared fixtures: small configs and models for CPU tests."""
from __future__ import annotations

import os
import sys

# Multi-node clusters on one machine (ray.cluster_utils.Cluster) need this before ray is first imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)


@pytest.fixture
def small_overrides(tmp_path):
    """--set overrides for a fast digits run writing into tmp_path."""
    return [f"output.dir={tmp_path / 'run'}", f"output.cache_dir={tmp_path / 'cache'}",
            "model.pretrain_epochs=3", "search.num_candidates=6", "search.top_k=2",
            "evaluation.calibration_batches=4", "evaluation.batch_size=64", "evaluation.heldout_size=200",
            "finetune.epochs=2", "finetune.scheduler=fifo", "search.max_concurrent_trials=2"]
