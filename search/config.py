"""Search configuration: one YAML file per search, read into pydantic models, every key overridable with --set."""
from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from typing import Annotated

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from prunetune.workers.criteria import CRITERIA
from prunetune.workers.constraints import CONSTRAINTS, Budget, parse_budget
from prunetune.workers.files import write_text
from prunetune.workers.latency import FIT_ERROR_BOUND
from prunetune.workers.messages import shown
from prunetune.workers.timing import RUNTIMES
from prunetune.workers.methods import METHODS, PruningMethod, misuse
from prunetune.workers.settings import EvaluationSettings, FinetuneSettings
from prunetune.workers.tasks import TASKS

from .algorithms import ALGORITHMS, SearchAlgorithm
from .sampler import budget_bands
from .config_file import (Choice, ConfigError, ExpandedPath, Section, parse_override, read_config,  # noqa: F401 (API)
                          validate)


def _auto(value: object) -> object:
    """A timeout's `auto` is its default, none: a limit derived from what was already timed (tune_search.Timeouts)."""
    return None if isinstance(value, str) and value.strip().lower() == "auto" else value


Timeout = Annotated[float | None, BeforeValidator(_auto)]  # seconds; none or auto: derived


def _target(value: object) -> object:
    """search.target as given: one fraction, a range [low, high], or a rising list of 3 or more budgets, each in
    (0, 1)."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                             for v in values):
        raise PydanticCustomError("target", "{value} is not a fraction, a range [low, high] or a list of budgets "
                                  "[a, b, c, ...]", {"value": shown(value)})
    if not all(0 < v < 1 for v in values):
        raise PydanticCustomError("target", "{value} is outside the allowed range (0, 1)", {"value": shown(value)})
    if isinstance(value, list) and (len(values) < 2 or any(a >= b for a, b in zip(values, values[1:]))):
        raise PydanticCustomError("target", "{value} is not a range [low, high] nor a list of budgets [a, b, c, ...] "
                                  "(rising, each in (0, 1))", {"value": shown(value)})
    return [float(v) for v in values] if isinstance(value, list) else value


# one fraction of the base; a range [low, high] (search.front_points budgets) or a list of 3 or more: a front
Target = Annotated[float | list[float], BeforeValidator(_target)]


# Counts a run holds in memory and on disk, bounded by what one run can hold: a candidate costs the driver ~64 ms and
# its store a record (docs: studies), so a million is ~18 hours of driver time alone; more is a typo, and a count
# of a billion would have the run build structures of that size before it could refuse anything.
MAX_CANDIDATES = 1_000_000
MAX_FINALISTS = 1_000  # each one fine-tuned and written as a model file
MAX_IMAGES = 10_000_000  # a synthetic split (its tensors are built in memory)
MAX_CLASSES = 100_000  # the classifier's outputs (ImageNet-21k has 21,841)
# The trial side's settings own their defaults; the sections below add the bounds, choices and notes.
_E, _F = EvaluationSettings(), FinetuneSettings()


class ModelConfig(Section):
    # a registered model (workers/models.py: digits_cnn, resnet20, resnet56, vgg16_bn, mobilenet_v1 at 32x32,
    # mobilenet_v1_224) or package.module:function (e.g. torchvision.models:resnet50; given num_classes if it takes it)
    name: str = "digits_cnn"
    # the trained model's weights: a torch.save file (read weights-only) or safetensors (guides: your model and
    # checkpoint); none: train one (cached)
    checkpoint: ExpandedPath | None = None
    checkpoint_key: str | None = None  # which state dict in the checkpoint, when several fit ('model_ema')
    kwargs: dict = {}  # keyword arguments of the model's factory
    task: str = "classification"  # classification | segmentation | yolo | package.module:function (returning a Task)
    pretrain_epochs: int = Field(30, ge=1)  # when no checkpoint is given
    # the base's training and sparsity training, with one warm-up epoch and the other finetune keys
    pretrain_lr: float = Field(0.05, gt=0)
    # group names, as `prunetune inspect` lists them: never pruned (the heads, the classifier among them, never are)
    ignored_layers: list = []
    # the L1 lambda of a sparsity-training stage before the search: Network Slimming (granularity channel), Filter
    # Skeleton (stripe); none: no such stage
    sparsity: float | None = Field(None, gt=0)
    sparsity_epochs: int = Field(5, ge=1)  # sparsity training of the base, before the search


class DataConfig(Section):
    # digits | cifar10 (the cifar-10-batches-py directory, read without torchvision) | imagefolder (root/<class>/*.jpg
    # or .png, or root/train and root/test or root/val holding those) | synthetic | yolo (a YOLO dataset YAML: guides:
    # tasks) | package.module:function returning (train, test, num_classes) or a DataBundle
    name: str = "digits"
    path: ExpandedPath | None = None  # the data set's directory (cifar10, imagefolder) or YAML file (yolo)
    # the side images are resized to (imagefolder, synthetic; yolo: a multiple of 32, none: 640)
    image_size: int | None = Field(None, ge=4)
    num_classes: int | None = Field(None, ge=2, le=MAX_CLASSES)  # synthetic only
    train_size: int = Field(2048, ge=2, le=MAX_IMAGES)  # synthetic only
    test_size: int = Field(512, ge=1, le=MAX_IMAGES)  # synthetic only
    seed: int = Field(0, ge=0)  # synthetic data
    # processes that read and augment images from files in every training, and that decode an image folder's images
    # in the driver (data held in memory is sliced in the training process); none: resources.cpus_per_trial - 1, at
    # most 8
    num_workers: int | None = Field(None, ge=0)
    kwargs: dict = {}  # keyword arguments of a package.module:function data factory
    # imagefolder, yolo: larger image files are refused (none: Pillow's limit, 178,956,970 pixels)
    max_image_pixels: int | None = Field(None, ge=1)


class SearchConfig(Section):
    constraint: Annotated[str, Choice(CONSTRAINTS)] = "flops"  # what the budget limits
    # a fraction of the unpruned network's cost, in (0, 1); a range [low, high] or a rising list [a, b, c, ...]: the
    # front of several budgets (guides: budgets and latency)
    target: Target = 0.5
    tolerance: float = Field(0.02, gt=0, le=1)  # a candidate meets a budget within +- this fraction
    front_points: int = Field(5, ge=2, le=MAX_FINALISTS)  # the budgets a target range is split into
    # further upper bounds, e.g. {latency: 0.6, params: 1.5M}: a fraction, 60%, milliseconds (12ms) for latency, a
    # count (2.1G, 300k) for flops and params
    limits: dict = {}
    # how strategies are proposed: tpe (Optuna's TPE), evolution, random (EagleEye's)
    algorithm: Annotated[str, Choice(ALGORITHMS, SearchAlgorithm)] = "tpe"
    population: int = Field(16, ge=2, le=MAX_CANDIDATES)  # evolution's population, TPE's random start (per budget)
    granularity: Annotated[str, Choice(METHODS, PruningMethod)] = "channel"  # what a ratio prunes (guides: methods)
    max_ratio: float = Field(0.7, gt=0, lt=1)  # the largest fraction of a layer's units a strategy prunes
    num_candidates: int = Field(32, ge=1, le=MAX_CANDIDATES)  # strategies scored, the baselines included
    seed: int = Field(0, ge=0)  # the strategies' draws
    criterion: Annotated[str, Choice(CRITERIA)] = "l1"  # how a layer's units are ranked for pruning
    # channel counts kept in multiples of it; none: 1, or the runtime's block (8) for a latency budget timed in
    # onnxruntime or openvino, whose kernels are fast and predictable only on such counts
    round_to: int | None = Field(None, ge=1)
    top_k: int = Field(3, ge=1, le=MAX_FINALISTS)  # finalists fine-tuned (per budget with a front)
    max_concurrent_trials: int = Field(2, ge=1, le=MAX_CANDIDATES)  # Ray Tune trials at once
    # candidates per trial (Tune's per-trial cost paid once); fewer at the end, spread over the trials
    batch_size: int = Field(8, ge=1, le=MAX_CANDIDATES)
    time_budget_s: float | None = Field(None, gt=0)  # the search's wall-clock limit; none: no limit
    max_failures: int = Field(1, ge=0)  # times Ray Tune retries a failed trial
    max_failed_fraction: float = Field(0.5, gt=0, le=1)  # more of the candidates failed: the search stops
    # a candidate still running after this is stored as failed and its worker replaced; none or auto: 10x the median
    # time between a trial's results so far, at least 60 s, no limit before the first result
    candidate_timeout_s: Timeout = Field(None, gt=0)


class EvaluationConfig(Section):
    heldout_size: int = Field(_E.heldout_size, ge=1)  # seeded subset of the training split: ranks the candidates
    # the finalists' own split (judges their epochs, ranks them); none: a fifth of the training split, at most 5,000
    # (workers/splits.py: the binomial standard error that gives)
    validation_size: int | None = Field(_E.validation_size, ge=1)
    seed: int = Field(_E.seed, ge=0)  # held-out and calibration draws
    # how BatchNorm statistics are recalibrated on training batches before a candidate is scored (adaptive BN)
    bn_mode: Annotated[str, Choice(("cumulative", "ema", "none"))] = _E.bn_mode
    calibration_batches: int = Field(_E.calibration_batches, ge=1)  # at most
    # stop once no BatchNorm statistic moves by more than this (bench/calibration.py: 3.3x faster, same ranking);
    # none: use every batch
    calibration_tolerance: float | None = Field(_E.calibration_tolerance, gt=0)
    batch_size: int = Field(_E.batch_size, ge=1)  # calibration batches
    score_batch_size: int = Field(_E.score_batch_size, ge=1)  # held-out scoring batches
    # accuracy: the task's own metric (classification: accuracy; segmentation: mIoU); loss: minus the held-out loss
    metric: Annotated[str, Choice(("accuracy", "loss"))] = _E.metric
    amp: Annotated[str, Choice(("auto", "bf16", "off"))] = _E.amp  # auto: bf16 autocast on CUDA
    channels_last: Annotated[str, Choice(("auto", "on", "off"))] = _E.channels_last  # auto: on CUDA

    def settings(self) -> EvaluationSettings:
        """What the trial side reads of this section (workers/settings.py)."""
        return self.as_settings(EvaluationSettings)


class FinetuneConfig(Section):
    epochs: int = Field(_F.epochs, ge=1)  # each finalist's fine-tuning
    batch_size: int = Field(_F.batch_size, ge=1)  # the global batch
    lr: float = Field(_F.lr, gt=0)  # a fifth of the base's training lr: docs/guides/finetuning.md measures it
    momentum: float = Field(_F.momentum, ge=0, lt=1)  # SGD's
    nesterov: bool = _F.nesterov  # SGD's Nesterov momentum
    weight_decay: float = Field(_F.weight_decay, ge=0)  # SGD's
    warmup_epochs: float = Field(_F.warmup_epochs, ge=0)  # a recalibrated network needs none
    label_smoothing: float = Field(_F.label_smoothing, ge=0, lt=1)  # classification only
    distill_weight: float = Field(_F.distill_weight, ge=0, le=1)  # from the base (the teacher); 0: off
    distill_temperature: float = Field(_F.distill_temperature, gt=0)  # of the distillation's softmax
    # asha: ASHA stops the finalists that fall behind; fifo: each one is fine-tuned for finetune.epochs
    scheduler: Annotated[str, Choice(("asha", "fifo"))] = "asha"
    grace_epochs: int | None = Field(None, ge=1)  # ASHA's first judgement; none: the warm-up + 2 epochs
    amp: Annotated[str, Choice(("auto", "bf16", "off"))] = _F.amp  # auto: bf16 autocast on CUDA
    channels_last: Annotated[str, Choice(("auto", "on", "off"))] = _F.channels_last  # auto: on CUDA
    seed: int = Field(_F.seed, ge=0)  # the fine-tuning's draws (data order, augmentation)
    # > 1: each finalist fine-tunes as a Ray Train TorchTrainer of this many DDP workers (gloo on CPU, NCCL on GPU),
    # each with resources.cpus_per_trial/gpus_per_trial; batch_size stays the global batch
    workers_per_finalist: int = Field(1, ge=1)
    # a finalist whose epoch runs longer than this is stopped (its last epoch kept); none or auto: 10x the median
    # time between a finalist's epochs so far, at least 60 s, no limit before the first epoch
    epoch_timeout_s: Timeout = Field(None, gt=0)

    def settings(self) -> FinetuneSettings:
        """The training recipe of this section (workers/settings.py); the rest is how the driver schedules it."""
        return self.as_settings(FinetuneSettings)


class LatencyConfig(Section):
    # where latency is timed: the table, the candidates, the report
    device: Annotated[str, Choice(("cpu", "cuda"))] = "cpu"
    # what it is timed in: eager PyTorch, or ONNX Runtime or OpenVINO (exported to ONNX, as it will be deployed)
    runtime: Annotated[str, Choice(RUNTIMES)] = "torch"
    batch_size: int = Field(1, ge=1)  # the latency budget's batch
    throughput_batch_size: int = Field(32, ge=1)  # the report's second figure
    threads: int | None = Field(1, ge=1)  # CPU threads of every timing (none: torch's)
    grid: int = Field(6, ge=2)  # channel counts timed per layer dimension
    repeats: int = Field(20, ge=3)  # timed passes per figure (the median of interleaved rounds is kept)
    # a table whose fit misses its own timed networks by more (a fraction) is timed again, then refused; never cached
    max_fit_error: float = Field(FIT_ERROR_BOUND, gt=0)


class ResourcesConfig(Section):
    cpus_per_trial: float = Field(1.0, gt=0)  # CPUs Ray reserves for each trial
    gpus_per_trial: float = Field(0.0, ge=0)  # GPUs Ray reserves for each trial; fractions share one GPU
    autoscaling: bool = False  # the cluster adds nodes on demand: do not refuse trials no current node can run


class RayConfig(Section):
    address: str | None = None  # none: start an embedded local Ray for the run
    num_cpus: int | None = Field(None, ge=1)  # what the embedded Ray may use; none: what it detects
    num_gpus: int | None = Field(None, ge=0)  # what the embedded Ray may use; none: what it detects
    dashboard: bool = False  # the embedded Ray's dashboard (~0.9 GiB of processes); a cluster keeps its own
    dashboard_host: str = "127.0.0.1"  # where the embedded Ray's dashboard listens


class OutputConfig(Section):
    dir: ExpandedPath = Field("runs/default", validate_default=True)  # the run: its config, candidates, finalists
    # trained base models, keyed by model, data (an imagefolder's content too) and training recipe; decoded images,
    # keyed by the files' paths, sizes, times and, up to 256 MiB in all, bytes
    cache_dir: ExpandedPath = Field("~/.cache/prunetune", validate_default=True)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    search: SearchConfig = SearchConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    latency: LatencyConfig = LatencyConfig()
    resources: ResourcesConfig = ResourcesConfig()
    ray: RayConfig = RayConfig()
    output: OutputConfig = OutputConfig()

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON-safe)."""
        return self.model_dump()


SECTIONS = tuple(Config.model_fields)
RENAMED = {"search.flops_target": "search.target (with search.constraint: flops, the default)",
           "resources.wait_for_gpus": "resources.autoscaling"}
# What `resume --set` may change: how the run is scheduled, never what it computes (rundir.config_hash covers every
# other key, output.* aside: where the run lives, which a resume does not move either).
RESUMABLE = ("ray", "resources", "search.time_budget_s", "search.max_failures", "search.max_concurrent_trials",
             "search.candidate_timeout_s", "finetune.epoch_timeout_s")


def resumable_keys(*sections: str) -> str:
    """The keys a resume may change (and `sections` besides), as a reader writes them: `ray.*, ...`."""
    return ", ".join(k if "." in k else f"{k}.*" for k in (*sections, *RESUMABLE))


def resumable(key: str) -> bool:
    """True if a resumed run may change `key` (section.key)."""
    return key in RESUMABLE or key.partition(".")[0] in RESUMABLE


def from_dict(raw: dict) -> Config:
    """Build a validated Config from a nested dict; unknown keys and bad values raise ConfigError."""
    cfg = validate(Config, raw, RENAMED)
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


def loader_workers(cfg: Config) -> int:
    """Processes that read training images from files: data.num_workers, or a trial's CPUs but one (at most 8)."""
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    return min(8, max(0, int(cfg.resources.cpus_per_trial) - 1))


def grace_epochs(cfg: Config) -> int:
    """Epochs before ASHA first judges a finalist: finetune.grace_epochs, or the warm-up and two epochs more (the
    first epoch after it dips and recovers: docs/guides/finetuning.md)."""
    f = cfg.finetune
    return min(f.epochs, f.grace_epochs or math.ceil(f.warmup_epochs) + 2)


def training_recipe(cfg: Config) -> FinetuneSettings:
    """The recipe of the trainings that start from scratch or the base (base and sparsity training): the fine-tuning
    recipe with model.pretrain_lr and one warm-up epoch."""
    return replace(cfg.finetune.settings(), lr=cfg.model.pretrain_lr, warmup_epochs=1.0)


def check_runtime(cfg: Config) -> None:
    """ConfigError naming the extra to install if latency.runtime does not import here."""
    runtime = RUNTIMES[cfg.latency.runtime]
    if runtime.package and importlib.util.find_spec(runtime.name) is None:
        raise ConfigError(f"latency.runtime: {runtime.name} is not installed; install {runtime.package}")


def needs_latency(cfg: Config) -> bool:
    """True when a budget of the search names latency (the latency table is built before the search)."""
    return cfg.search.constraint == "latency" or "latency" in cfg.search.limits


def _cross_check(cfg: Config) -> None:
    budgets(cfg)
    if cfg.search.round_to is None:
        latency = needs_latency(cfg) and METHODS[cfg.search.granularity].round_to
        cfg.search.round_to = RUNTIMES[cfg.latency.runtime].channel_block if latency else 1
    problem = misuse(METHODS[cfg.search.granularity], cfg.search.criterion, needs_latency(cfg), cfg.search.round_to,
                     cfg.model.sparsity is not None, METHODS)
    if problem:
        raise ConfigError(problem)
    _check_target(cfg.search)
    if cfg.search.top_k > cfg.search.num_candidates:
        raise ConfigError(f"search.top_k: {cfg.search.top_k} is more than search.num_candidates "
                          f"({cfg.search.num_candidates})")
    if cfg.data.name in ("cifar10", "imagefolder", "yolo") and not cfg.data.path:
        raise ConfigError(f"data.path: data set '{cfg.data.name}' needs a path")
    task = cfg.model.task
    if task not in TASKS and ":" not in task:
        raise ConfigError(f"model.task: unknown task '{task}'; allowed: {', '.join(TASKS)} or package.module:function")
    if task != "classification":
        for key, value in (("finetune.label_smoothing", cfg.finetune.label_smoothing), ("model.sparsity",
                                                                                          cfg.model.sparsity)):
            if value:
                raise ConfigError(f"{key}: classification only; model.task is {task}")
    if cfg.evaluation.metric == "loss" and task in TASKS and "loss" not in TASKS[task].metrics:
        raise ConfigError(f"evaluation.metric: task {task} gives no held-out loss; allowed: accuracy (its "
                          f"{TASKS[task].metric})")
    runtime = RUNTIMES[cfg.latency.runtime]
    if needs_latency(cfg):
        check_runtime(cfg)
    if needs_latency(cfg) and runtime.cpu_only and cfg.latency.device != "cpu":
        raise ConfigError(f"latency.runtime: {runtime.name} times on the CPU here; set latency.device: cpu")
    if cfg.finetune.nesterov and cfg.finetune.momentum == 0:
        raise ConfigError("finetune.momentum: 0 does not go with finetune.nesterov: true; set a momentum > 0 or "
                          "finetune.nesterov: false")


def front(cfg: Config) -> bool:
    """True when search.target is a range or a list of budgets: the run searches and reports a front."""
    return isinstance(cfg.search.target, list)


def _check_target(s: SearchConfig) -> None:
    """search.tolerance below the (lowest) budget, and a list's bands apart (a candidate is in one budget)."""
    if isinstance(s.target, list) and len(s.target) == 2:
        return  # a range's bands reach half way to their neighbours: the tolerance is not used
    lowest = min(s.target) if isinstance(s.target, list) else s.target
    if s.tolerance >= lowest:
        raise ConfigError(f"search.tolerance: {s.tolerance} must be below search.target ({shown(s.target)})")
    budgets = [b for b, _ in budget_bands(s.target, s.tolerance)]
    close = next(((a, b) for a, b in zip(budgets, budgets[1:]) if b - a < 2 * s.tolerance), None)
    if close:
        raise ConfigError(f"search.target: budgets {close[0]} and {close[1]} are closer than twice search.tolerance "
                          f"({s.tolerance}): their bands would overlap; space them further or lower the tolerance")


# The data keys each data source reads (a factory reads kwargs; every source reads num_workers).
_DATA_KEYS = {"digits": set(), "cifar10": {"path"}, "imagefolder": {"path", "image_size", "max_image_pixels"},
              "synthetic": {"image_size", "num_classes", "train_size", "test_size", "seed"},
              "yolo": {"path", "image_size", "max_image_pixels"}}


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are allowed but probably not what the user meant, one line each."""
    found = []
    used = _DATA_KEYS.get(cfg.data.name, {"kwargs"}) | {"name", "num_workers"}
    for key, field in DataConfig.model_fields.items():
        if key not in used and getattr(cfg.data, key) != field.default:
            found.append(f"data.{key} is ignored for data set '{cfg.data.name}'")
    sparsity = METHODS[cfg.search.granularity].sparsity
    if cfg.model.sparsity and sparsity and sparsity.criterion not in (None, cfg.search.criterion):
        found.append(f"model.sparsity makes {sparsity.values} meaningful, but search.criterion is "
                     f"{cfg.search.criterion}; {sparsity.name} ranks {METHODS[cfg.search.granularity].units} with "
                     f"search.criterion: {sparsity.criterion}")
    if front(cfg) and cfg.finetune.scheduler == "asha":
        found.append("search.target is a front of budgets and finetune.scheduler is asha: ASHA judges every budget's "
                     "finalists against one another and stops the smaller budgets' early; finetune.scheduler: fifo "
                     "fine-tunes each one for finetune.epochs")
    if cfg.ray.dashboard and cfg.ray.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        found.append(f"ray.dashboard_host: {cfg.ray.dashboard_host} opens Ray's dashboard and job API to the network; "
                     "anyone who reaches it can run code on this machine")
    return found


def load_config(path: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML config (none: the built-in digits default) and apply `section.key=value` overrides."""
    return from_dict(read_config(path, overrides))


def save_config(cfg: Config, path: str) -> None:
    """Write the config as YAML (atomically, durably: it identifies the run)."""
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False), durable=True)

