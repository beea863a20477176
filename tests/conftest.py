"""Test session set-up: the repository on sys.path (tests.* helpers), one torch thread, local multi-node Ray."""
from __future__ import annotations

import os
import sys

# Multi-node clusters on one machine (ray.cluster_utils.Cluster) need this before ray is first imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Progress lines come when work takes longer than PROGRESS_EVERY_S: on a busy machine they would add lines to what
# tests compare; the tests of those lines set it themselves. Child processes inherit it.
os.environ.setdefault("PRUNETUNE_PROGRESS_EVERY_S", "1e9")
# The Rays the tests start themselves (ray_session, multi-node clusters) prestart no idle workers either, as the
# embedded Ray of a run does (search/cluster.py): a worker process per CPU that no test uses, ~1 CPU s each.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
# One intra-op thread in every process the tests start (the runs' drivers, Ray's processes), as in this one: two
# xdist workers share the machine's cores, and a torch process with two OpenMP threads that must share a core with
# another busy process spins at every parallel region (measured on 2 cores: a digits base-training epoch 9.4 s with
# two threads next to one busy process, 0.3 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


# The slowest test files, slowest first (a full run's --durations): pyproject's `--dist loadfile
# --no-loadscope-reorder` hands files to the two xdist workers in collection order, so these start first and the
# short files fill the end (xdist's own order, most tests first, left the one-test test_ddp.py for last). Only the
# order depends on this list; a file not in it runs after those in it.
SLOWEST_FIRST = ["test_resume.py", "test_search.py", "test_interrupts.py", "test_examples.py", "test_faults.py",
                 "test_timeouts.py", "test_ddp.py", "test_benches.py", "test_cluster.py", "test_logs.py",
                 "test_reliability.py"]


def pytest_collection_modifyitems(items):
    """The files of SLOWEST_FIRST first, in its order; each file's tests in their order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
