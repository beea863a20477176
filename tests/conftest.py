"""Test session set-up: the repository on sys.path (tests.* helpers), one torch thread, local multi-node Ray."""
from __future__ import annotations

import os
import sys

# Multi-node clusters on one machine (ray.cluster_utils.Cluster) need this before ray is first imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)
