"""prunetune driver side: config, strategy space, sampler, and the Ray Tune search."""
from .config import load_config
from .sampler import StrategySampler
from .space import PruningSpace

__all__ = ["load_config", "PruningSpace", "StrategySampler"]
