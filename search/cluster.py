"""Ray itself: connect to a cluster or start an embedded one, check what it can run, validate cluster.yaml."""
from __future__ import annotations

import copy
import logging
import os

import yaml

from .config import Config, ConfigError


def quiet_tune() -> None:
    """Tune settings for many short trials: no per-trial result files, no snapshot-rate warnings."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.tune.analysis.experiment_analysis", "ray.tune.tune", "ray.tune.execution.experiment_state"):
        logging.getLogger(name).setLevel(logging.ERROR)


def connect(cfg: Config, address: str | None = None) -> bool:
    """Connect to the configured Ray cluster, or start an embedded one; True if this call started Ray."""
    import ray

    quiet_tune()
    if ray.is_initialized():
        return False
    address = address or cfg.ray.address
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, dashboard_host=cfg.ray.dashboard_host,
                 log_to_driver=False)
    return True


def check_resources(cfg: Config) -> None:
    """Refuse GPU trials on a cluster without GPUs (instead of pending forever)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    want = cfg.resources.gpus_per_trial
    if want > 0 and gpus < want and not cfg.resources.wait_for_gpus:
        raise ConfigError(f"resources.gpus_per_trial: {want} GPU per trial, but the Ray cluster has {gpus:g} GPU; "
                          "set it to 0 for CPU trials (or resources.wait_for_gpus: true if GPU nodes autoscale)")


def validate_cluster_config(path: str) -> dict:
    """Load a cluster launcher YAML and run Ray's schema validation on it (no cloud account needed)."""
    from ray.autoscaler._private.util import prepare_config, validate_config  # private: wrapped here only

    with open(path) as f:
        config = yaml.safe_load(f)
    validate_config(prepare_config(copy.deepcopy(config)))
    return config
