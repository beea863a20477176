"""prunetune: search the best way to prune a CNN under a compute budget (EagleEye on Ray Tune).

The public API; `prunetune.search` is the driver side, `prunetune.workers` what runs in a trial (no Ray). The
worker functions take the worker's own settings (`EvaluationSettings`, `FinetuneSettings`, `FinetuneOptions`,
`PreflightOptions`); the driver's YAML config (`load_config`, `Config`) is imported only when first named.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from prunetune.search.artifacts import load_pruned
from prunetune.search.sampler import StrategySampler
from prunetune.workers.adaptive_bn import recalibrate_bn
from prunetune.workers.constraints import CONSTRAINTS
from prunetune.workers.data import DataBundle, load_data
from prunetune.workers.evaluator import CandidateEvaluator
from prunetune.workers.finetune import FinetuneOptions, finetune
from prunetune.workers.models import build_model
from prunetune.workers.preflight import PreflightOptions, preflight
from prunetune.workers.prune import PrunePlan, prune
from prunetune.workers.scoring import score
from prunetune.workers.settings import EvaluationSettings, FinetuneSettings
from prunetune.workers.space import PruningSpace

if TYPE_CHECKING:
    from prunetune.search.config import Config, load_config

_DRIVER_CONFIG = ("Config", "load_config")  # from prunetune.search.config, on first use

__all__ = ["load_config", "Config", "PruningSpace", "StrategySampler", "CONSTRAINTS", "preflight",
           "PreflightOptions", "prune", "PrunePlan", "recalibrate_bn", "score", "CandidateEvaluator",
           "EvaluationSettings", "finetune", "FinetuneSettings", "FinetuneOptions", "build_model", "load_data",
           "DataBundle", "load_pruned"]


def __getattr__(name: str) -> Any:
    """The driver's config names, imported when first asked for (the worker API runs without them)."""
    if name in _DRIVER_CONFIG:
        return getattr(importlib.import_module("prunetune.search.config"), name)
    raise AttributeError(f"module 'prunetune' has no attribute {name!r}")
