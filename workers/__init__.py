"""prunetune worker side: what runs inside a trial (prune, recalibrate BN, score, fine-tune). Needs no Ray."""
from .adaptive_bn import recalibrate_bn
from .data import DataBundle, load_data
from .evaluator import CandidateEvaluator
from .finetune import finetune
from .models import build_model
from .prune import PrunePlan, prune
from .scoring import score

__all__ = ["prune", "recalibrate_bn", "score", "CandidateEvaluator", "finetune", "PrunePlan", "build_model",
           "load_data", "DataBundle"]
