"""The Ray cluster launcher config (cluster.yaml), validated offline with Ray's own validator."""
from __future__ import annotations

import copy

import yaml


def validate_cluster_config(path: str) -> dict:
    """Load a cluster launcher YAML and run Ray's schema validation on it (no cloud account needed)."""
    from ray.autoscaler._private.util import prepare_config, validate_config  # private: wrapped here only

    with open(path) as f:
        config = yaml.safe_load(f)
    validate_config(prepare_config(copy.deepcopy(config)))
    return config
