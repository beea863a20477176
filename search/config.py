"""Search configuration: one YAML file per search, read into dataclasses, every key overridable with --set."""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from prunetune.workers.constraints import CONSTRAINTS, Budget, parse_budget
from prunetune.workers.files import write_text
from prunetune.workers.granularity import GRANULARITIES

from .algorithms import ALGORITHMS


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what is allowed."""


def _choice(*values: str) -> dict:
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open, hi_open)}


@dataclass
class ModelConfig:
    name: str = "digits_cnn"  # registry name or package.module:function
    checkpoint: str | None = None  # state dict of the trained model; none: train one (cached)
    kwargs: dict = field(default_factory=dict)
    pretrain_epochs: int = field(default=30, metadata=_range(1))  # when no checkpoint is given
    ignored_layers: list = field(default_factory=list)  # layers never pruned (the classifier always is)
    sparsity: float | None = field(default=None, metadata=_range(0, lo_open=True))  # L1 lambda: slimming, skeleton
    sparsity_epochs: int = field(default=5, metadata=_range(1))  # sparsity training of the base, before the search


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cifar10 | imagefolder | synthetic | package.module:function
    path: str | None = None
    image_size: int | None = field(default=None, metadata=_range(4))
    num_classes: int | None = field(default=None, metadata=_range(2))
    train_size: int = field(default=2048, metadata=_range(2))  # synthetic only
    test_size: int = field(default=512, metadata=_range(1))  # synthetic only
    seed: int = field(default=0, metadata=_range(0))  # synthetic data
    num_workers: int = field(default=0, metadata=_range(0))
    kwargs: dict = field(default_factory=dict)  # factory only


@dataclass
class SearchConfig:
    constraint: str = field(default="flops", metadata=_choice(*CONSTRAINTS))  # what the budget limits
    target: float = field(default=0.5, metadata=_range(0, 1, lo_open=True, hi_open=True))  # fraction of the base
    tolerance: float = field(default=0.02, metadata=_range(0, 1, lo_open=True))
    limits: dict = field(default_factory=dict)  # further upper bounds, e.g. {latency: 0.6, params: '1.5M'}
    algorithm: str = field(default="tpe", metadata=_choice(*ALGORITHMS))  # how strategies are proposed
    population: int = field(default=16, metadata=_range(2))  # evolution's population, TPE's random start
    granularity: str = field(default="channel", metadata=_choice(*GRANULARITIES))  # what a ratio prunes
    max_ratio: float = field(default=0.7, metadata=_range(0, 1, lo_open=True, hi_open=True))
    num_candidates: int = field(default=32, metadata=_range(1))
    seed: int = field(default=0, metadata=_range(0))
    criterion: str = field(default="l1", metadata=_choice("l1", "l2", "bn_scale", "random"))
    round_to: int = field(default=1, metadata=_range(1))
    top_k: int = field(default=3, metadata=_range(1))
    max_concurrent_trials: int = field(default=2, metadata=_range(1))
    time_budget_s: float | None = field(default=None, metadata=_range(0, lo_open=True))
    max_failures: int = field(default=1, metadata=_range(0))
    max_failed_fraction: float = field(default=0.5, metadata=_range(0, 1, lo_open=True))


@dataclass
class EvaluationConfig:
    heldout_size: int = field(default=300, metadata=_range(1))  # seeded subset of the training split
    seed: int = field(default=0, metadata=_range(0))  # held-out and calibration draws
    bn_mode: str = field(default="cumulative", metadata=_choice("cumulative", "ema", "none"))
    calibration_batches: int = field(default=50, metadata=_range(1))
    # stop once no BatchNorm statistic moves by more than this (bench/calibration.py: 3.3x faster, same ranking)
    calibration_tolerance: float | None = field(default=0.02, metadata=_range(0, lo_open=True))
    batch_size: int = field(default=128, metadata=_range(1))
    score_batch_size: int = field(default=500, metadata=_range(1))
    metric: str = field(default="accuracy", metadata=_choice("accuracy", "loss"))
    amp: str = field(default="auto", metadata=_choice("auto", "bf16", "off"))
    channels_last: str = field(default="auto", metadata=_choice("auto", "on", "off"))


@dataclass
class FinetuneConfig:
    epochs: int = field(default=5, metadata=_range(1))
    batch_size: int = field(default=64, metadata=_range(1))
    lr: float = field(default=0.05, metadata=_range(0, lo_open=True))
    momentum: float = field(default=0.9, metadata=_range(0, 1, hi_open=True))
    nesterov: bool = True
    weight_decay: float = field(default=1e-4, metadata=_range(0))
    warmup_epochs: float = field(default=1.0, metadata=_range(0))
    label_smoothing: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))
    distill_weight: float = field(default=0.0, metadata=_range(0, 1))
    distill_temperature: float = field(default=4.0, metadata=_range(0, lo_open=True))
    scheduler: str = field(default="asha", metadata=_choice("asha", "fifo"))
    grace_epochs: int = field(default=1, metadata=_range(1))
    seed: int = field(default=0, metadata=_range(0))


@dataclass
class LatencyConfig:
    device: str = field(default="cpu", metadata=_choice("cpu", "cuda"))  # where latency is timed
    batch_size: int = field(default=1, metadata=_range(1))  # the latency budget's batch
    throughput_batch_size: int = field(default=32, metadata=_range(1))  # the report's second figure
    threads: int | None = field(default=1, metadata=_range(1))  # CPU threads of every timing (none: torch's)
    grid: int = field(default=6, metadata=_range(2))  # channel counts timed per layer dimension
    repeats: int = field(default=20, metadata=_range(3))  # timed passes per figure (the median is kept)


@dataclass
class ResourcesConfig:
    cpus_per_trial: float = field(default=1.0, metadata=_range(0, lo_open=True))
    gpus_per_trial: float = field(default=0.0, metadata=_range(0))
    autoscaling: bool = False  # the cluster adds nodes on demand: do not refuse trials no current node can run


@dataclass
class RayConfig:
    address: str | None = None  # none: start an embedded local Ray for the run
    num_cpus: int | None = field(default=None, metadata=_range(1))
    num_gpus: int | None = field(default=None, metadata=_range(0))
    dashboard: bool = False  # the embedded Ray's dashboard (~0.9 GiB of processes); a cluster keeps its own
    dashboard_host: str = "127.0.0.1"


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    cache_dir: str = "~/.cache/prunetune"  # trained base models and decoded image caches


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON-safe)."""
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
RENAMED = {"search.flops_target": "search.target (with search.constraint: flops, the default)",
           "resources.wait_for_gpus": "resources.autoscaling"}


def _convert(key: str, value: Any, annotation: str) -> Any:
    """Coerce a YAML value to the field's declared type, or raise ConfigError."""
    optional = "None" in annotation
    if optional and isinstance(value, str) and value.strip().lower() == "none":
        value = None  # --set key=none clears an optional key (YAML's own null is `null` or `~`)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed; expected {annotation}")
    base = annotation.replace(" | None", "").strip()
    if base == "float" and isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        "str": lambda v: isinstance(v, str),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "dict": lambda v: isinstance(v, dict),
        "list": lambda v: isinstance(v, list),
    }[base]
    if not ok(value):
        raise ConfigError(f"{key}: {value!r} is not a valid {base}")
    return float(value) if base == "float" else value


def _check(key: str, value: Any, meta: typing.Mapping, shown: Any) -> None:
    """Raise ConfigError if `value` breaks the field's choices or range (`shown` is what the user wrote)."""
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: {shown!r} is not allowed; allowed: {', '.join(meta['choices'])}")
    if "range" in meta:
        lo, hi, lo_open, hi_open = meta["range"]
        bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
              (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            raise ConfigError(f"{key}: {shown!r} is outside the allowed range {span}")


def from_dict(raw: dict) -> Config:
    """Build a validated Config from a nested dict; unknown keys and bad values raise ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError("config: the file must hold a mapping of sections")
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; allowed: {', '.join(SECTIONS)}")
    cfg = Config()
    for section in SECTIONS:
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: must be a mapping of keys, got {values!r}")
        obj = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        for key, value in values.items():
            if f"{section}.{key}" in RENAMED:
                raise ConfigError(f"{section}.{key}: renamed to {RENAMED[f'{section}.{key}']}")
            if key not in fields:
                raise ConfigError(f"{section}.{key}: unknown key; allowed: {', '.join(fields)}")
            f = fields[key]
            if isinstance(value, bool) and "off" in f.metadata.get("choices", ()):
                value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
            converted = _convert(f"{section}.{key}", value, str(f.type))
            _check(f"{section}.{key}", converted, f.metadata, value)
            setattr(obj, key, converted)
    _cross_check(cfg)
    return cfg


def budgets(cfg: Config) -> list[Budget]:
    """The search's upper bounds besides its target (`search.limits`), parsed."""
    found = []
    for name, value in cfg.search.limits.items():
        try:
            found.append(parse_budget(f"search.limits.{name}", str(name), value))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return found


def needs_latency(cfg: Config) -> bool:
    """True when a budget of the search names latency (the latency table is built before the search)."""
    return cfg.search.constraint == "latency" or "latency" in cfg.search.limits


def _cross_check(cfg: Config) -> None:
    budgets(cfg)
    units = {"unstructured": "single weights", "stripe": "stripes"}.get(cfg.search.granularity)
    if units:  # what makes no sense unless whole channels are pruned
        name = "stripe-wise" if cfg.search.granularity == "stripe" else "unstructured"
        for key, bad, why in (
                ("search.criterion", cfg.search.criterion == "bn_scale", f"bn_scale ranks channels by BatchNorm "
                 f"scales; {name} pruning ranks {units}: use l1 (magnitude), l2 or random"),
                ("search.constraint", needs_latency(cfg), f"latency budgets need channel pruning: the latency table "
                 f"times dense layers by their channel counts, and {name} pruning keeps {units} (use flops or params)"),
                ("search.round_to", cfg.search.round_to != 1, f"rounds channel counts; {name} pruning keeps {units} "
                 "(leave it at 1)"),
                ("model.sparsity", cfg.model.sparsity is not None and units == "single weights", "Network Slimming "
                 "prunes channels; use it with search.granularity: channel")):
            if bad:
                raise ConfigError(f"{key}: {why}")
    if cfg.search.tolerance >= cfg.search.target:
        raise ConfigError(f"search.tolerance: {cfg.search.tolerance} must be below search.target "
                          f"({cfg.search.target})")
    if cfg.search.top_k > cfg.search.num_candidates:
        raise ConfigError(f"search.top_k: {cfg.search.top_k} is more than search.num_candidates "
                          f"({cfg.search.num_candidates})")
    if cfg.data.name in ("cifar10", "imagefolder") and not cfg.data.path:
        raise ConfigError(f"data.path: data set '{cfg.data.name}' needs a path")
    if cfg.finetune.nesterov and cfg.finetune.momentum == 0:
        raise ConfigError("finetune.momentum: 0 does not go with finetune.nesterov: true; set a momentum > 0 or "
                          "finetune.nesterov: false")


# The data keys each data source reads (a factory reads kwargs; every source reads num_workers).
_DATA_KEYS = {"digits": set(), "cifar10": {"path"}, "imagefolder": {"path", "image_size"},
              "synthetic": {"image_size", "num_classes", "train_size", "test_size", "seed"}}


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are allowed but probably not what the user meant, one line each."""
    found = []
    used = _DATA_KEYS.get(cfg.data.name, {"kwargs"}) | {"name", "num_workers"}
    default = DataConfig()
    for f in dataclasses.fields(DataConfig):
        if f.name not in used and getattr(cfg.data, f.name) != getattr(default, f.name):
            found.append(f"data.{f.name} is ignored for data set '{cfg.data.name}'")
    if cfg.model.sparsity and cfg.search.granularity == "channel" and cfg.search.criterion != "bn_scale":
        found.append(f"model.sparsity makes |gamma| meaningful, but search.criterion is {cfg.search.criterion}; "
                     "Network Slimming ranks channels with search.criterion: bn_scale")
    if cfg.ray.dashboard and cfg.ray.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        found.append(f"ray.dashboard_host: {cfg.ray.dashboard_host} opens Ray's dashboard and job API to the network; "
                     "anyone who reaches it can run code on this machine")
    return found


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value` into the dotted key and its YAML-parsed value."""
    key, sep, value = text.partition("=")
    if not sep or key.count(".") != 1:
        raise ConfigError(f"--set {text}: expected section.key=value (e.g. search.target=0.4)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not a silent override."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicate = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if duplicate is not None:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{duplicate}'", node.start_mark)
        return super().construct_mapping(node, deep)


def load_config(path: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML config (none: the built-in digits default) and apply `section.key=value` overrides."""
    raw: dict = {}
    if path:
        if os.path.isdir(path):
            raise ConfigError(f"config: {path} is a directory, not a YAML file")
        if not os.path.isfile(path):
            raise ConfigError(f"config: file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config: {path} is not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {path} must hold a mapping of sections")
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        section, name = key.split(".", 1)
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"{section}: must be a mapping of keys")
        raw[section][name] = value
    return from_dict(raw)


def save_config(cfg: Config, path: str) -> None:
    """Write the config as YAML (atomically, durably: it identifies the run)."""
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False), durable=True)


def expand(path: str) -> str:
    """A config path with ~ and environment variables expanded."""
    return os.path.expandvars(os.path.expanduser(path))
