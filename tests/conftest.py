"""Test session set-up: the repository on sys.path (tests.* helpers), one torch thread, local multi-node Ray."""
from __future__ import annotations

import os
import sys

# Multi-node clusters on one machine (ray.cluster_utils.Cluster) need this before ray is first imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Progress lines come when work takes longer than PROGRESS_EVERY_S: on a busy machine they would add lines to what
# tests compare; the tests of those lines set it themselves. Child processes inherit it.
os.environ.setdefault("PRUNETUNE_PROGRESS_EVERY_S", "1e9")

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_session():
    """One embedded Ray for a test module (started on first use)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
