"""prunetune: search the best way to prune a CNN under a compute budget (EagleEye on Ray Tune).

The public API; `prunetune.search` is the driver side, `prunetune.workers` what runs in a trial (no Ray).
"""
from prunetune.search.artifacts import load_pruned
from prunetune.search.config import Config, load_config
from prunetune.search.sampler import StrategySampler
from prunetune.workers.adaptive_bn import recalibrate_bn
from prunetune.workers.constraints import CONSTRAINTS
from prunetune.workers.data import DataBundle, load_data
from prunetune.workers.evaluator import CandidateEvaluator
from prunetune.workers.finetune import finetune
from prunetune.workers.models import build_model
from prunetune.workers.preflight import preflight
from prunetune.workers.prune import PrunePlan, prune
from prunetune.workers.scoring import score
from prunetune.workers.space import PruningSpace

__all__ = ["load_config", "Config", "PruningSpace", "StrategySampler", "CONSTRAINTS", "preflight", "prune",
           "PrunePlan", "recalibrate_bn", "score", "CandidateEvaluator", "finetune", "build_model", "load_data",
           "DataBundle", "load_pruned"]
