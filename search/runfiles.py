"""The run's own files as types: final/summary.json, manifest.json, exports.json and the record a model file
carries. Each is a dataclass with a `schema_version`, written (`to_json`) and read (`from_json`) here only; a
file without a schema_version is version 1, the layout prunetune wrote before these types, and `from_json` reads it.

Version 2 names the task's primary metric in a field (`metric`, or `task.metric`) instead of inside key names:
version 1's `test_accuracy`, `val_accuracy_margin` (`test_miou`, ...) are `test`, `val_margin`. A model file's
metrics carry their schema_version beside the figures.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union

from prunetune.workers.errors import BadInput
from prunetune.workers.files import write_json

SCHEMA_VERSION = 2  # what this prunetune writes; it reads 1 (no schema_version) and 2
SUMMARY = "final/summary.json"  # paths in the run directory
MANIFEST = "manifest.json"
EXPORTS = "exports.json"

T = TypeVar("T", bound="RunFile")


class RunFileError(BadInput, ValueError):
    """A run file (or model file) this prunetune cannot read: not JSON, not its own, or from a newer prunetune."""


@dataclass(kw_only=True)
class RunFile:
    """A typed JSON record: `to_json` writes its fields, `from_json` builds it from what `to_json` (or version 1)
    wrote; a required field missing is a RunFileError naming the file and the field."""

    name: ClassVar[str] = "run file"  # how errors name the file (the run files' path in the run directory)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready dicts and lists."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls: type[T], data: Any) -> T:
        """The record in `data`, as this version writes it (subclasses that changed read version 1 too)."""
        _check_version(data, cls.name)
        return _build(cls, data, cls.name)


def _check_version(data: Any, name: str) -> int:
    """The schema_version of a file's top-level object (1 where absent); newer than this prunetune: RunFileError."""
    if not isinstance(data, dict):
        raise RunFileError(f"{name}: not a prunetune file (expected a JSON object)")
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise RunFileError(f"{name}: schema_version {version!r} is not one this prunetune reads (1 to "
                          f"{SCHEMA_VERSION}; a newer prunetune wrote it?)")
    return version


def _build(cls: Any, data: Any, where: str) -> Any:
    """cls from a dict: nested dataclasses built from their own dicts, keys the class does not know left out."""
    if not isinstance(data, dict):
        raise RunFileError(f"{where}: expected a JSON object, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _value(hints[f.name], data[f.name], f"{where}: {f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RunFileError(f"{where}: no {f.name} (not a file this prunetune wrote?)")
    return cls(**values)


def _value(hint: Any, value: Any, where: str) -> Any:
    """A field's value as its type hint says: dataclasses (alone, optional, in a list or as dict values) built."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _value(inner[0], value, where) if len(inner) == 1 else value
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return {k: _build(args[1], v, f"{where}[{k}]") for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    return value


def _unprefixed(entry: dict[str, Any], metric: str) -> dict[str, Any]:
    """A version-1 model entry with the metric taken out of its key names (`test_accuracy` -> `test`)."""
    names = {f"val_{metric}_before_finetune": "val_before_finetune", f"val_{metric}_margin": "val_margin",
             f"val_{metric}": "val", f"test_{metric}": "test"}
    return {"metric": metric, **{names.get(k, k): v for k, v in entry.items()}}


# --- the model file's record and figures (final/rankN.pt, final/candidate-N-<hash>.pt) ---

@dataclass(kw_only=True)
class BaseCheckpoint:
    """The base checkpoint a pruned model was cut from."""

    path: str  # where it was when the model was written
    sha256: str | None  # its checksum (None: the file was not there)


@dataclass(kw_only=True)
class ModelRecord(RunFile):
    """Everything needed to rebuild and use a pruned network (model files and exports carry it as JSON).

    Architecture, input shape and contract, what its output is for, strategy, base reference."""

    name: ClassVar[str] = "model file"
    schema_version: int = SCHEMA_VERSION  # 1 where absent: the layout before these types
    model: dict[str, Any]  # the architecture: name, num_classes, in_channels, kwargs
    input_shape: list[int]  # one input's shape, [C, H, W]
    round_to: int  # channel counts kept are multiples of it
    input: dict[str, Any] | None  # the input contract: shape, scale, mean, std, classes, resize (None: a factory's)
    task: str  # model.task: what the output is scored for
    ignored_layers: list[str]  # layers never pruned (the classifier first)
    granularity: str  # the pruning method
    ratios: list[float]  # the strategy: one pruning ratio per group
    criterion: str  # the importance criterion
    kept_units: list[int]  # units (channels, ...) kept per group
    flops: int  # of the pruned network, as fvcore counts them
    params: int
    base_flops: int  # of the unpruned network
    base_checkpoint: BaseCheckpoint


@dataclass(kw_only=True)
class Timings:
    """A model's timings, in latency.runtime with the configured threads."""

    latency_ms_batch1: float  # median of repeated batch-1 forward passes
    latency_iqr_ms: float  # their interquartile range
    throughput_batch: int  # the throughput batch's size
    latency_ms_throughput: float  # median latency of the throughput batch
    images_per_s: float  # images per second at the throughput batch
    # a run with a latency table: the median latency at the table's batch, timed as the table times, and the
    # table's prediction of it
    latency_ms_budget_batch: float | None = None
    latency_predicted_ms: float | None = None


@dataclass(kw_only=True)
class Figures(Timings, RunFile):
    """A fine-tuned model's figures, as its model file stores them."""

    name: ClassVar[str] = "model file metrics"
    metric: str  # the task's primary metric: what `val` and `test` measure
    candidate: int  # the candidate's index in the search
    adaptive_bn_score: float  # its search score
    val_before_finetune: float | None  # `metric` on the validation split before fine-tuning
    val: float | None  # `metric` on the validation split, the kept epoch
    test: float  # `metric` on the test split, the kept epoch
    epochs: int  # epochs fine-tuned
    kept_epoch: int | None  # the epoch kept (0: the pruned network before fine-tuning)
    flops: int  # as fvcore counts them
    flops_ratio: float  # of the base's FLOPs
    params: int
    path: str  # the model file

    @classmethod
    def from_json(cls, data: Any) -> Figures:
        """The figures of a model file: a final model's (it has a rank) or a refinetuned candidate's."""
        if not isinstance(data, dict):
            raise RunFileError(f"{cls.name}: expected a JSON object")
        if _check_version(data, cls.name) == 1:
            metric = next((k[5:] for k in data if k.startswith("test_")), "accuracy")
            data = _unprefixed(data, metric)
        return _build(FinalModel if "rank" in data else Refinetuned, data, cls.name)


@dataclass(kw_only=True)
class OnnxFigures:
    """An ONNX model measured on the test split given as raw pixel values (ONNX Runtime on this CPU)."""

    test_accuracy: float  # on the test split (int8 export is for classification runs only)
    size_mb: float  # the file's size
    latency_ms_batch1: float  # median batch-1 latency with the configured threads


@dataclass(kw_only=True)
class Int8(OnnxFigures):
    """`prunetune export --quantize int8` of a final model: the int8 model's figures beside the fp32 model's."""

    fp32: OnnxFigures
    written: bool  # False: it lost more than --max-accuracy-drop
    accuracy_drop_points: float  # fp32 minus int8 test accuracy, in points
    path: str | None  # the int8 file (None if not written)


@dataclass(kw_only=True)
class FinalModel(Figures):
    """One of the run's final models (final/rankN.pt), in the recommended order."""

    rank: int  # its place: 1 is the recommended model
    search_rank: int  # its place by search score
    val_margin: float | None  # the smallest difference the validation split tells apart
    tied_with_best: bool  # not distinguishable from the best on validation
    fine_tuned: bool  # a fine-tuned epoch was kept
    over_latency_budget: bool = False  # timed at the table's batch in latency.runtime, over a latency budget
    size_mb: float | None = None  # the model file's size (None in the file itself: written before it was known)
    int8: Int8 | None = None  # its int8 export's figures, once `prunetune export --quantize int8` ran


@dataclass(kw_only=True)
class Refinetuned(Figures):
    """A candidate fine-tuned again by `prunetune finetune` (final/candidate-N-<recipe hash>.pt)."""

    finetune: dict[str, Any]  # the finetune.* recipe it was fine-tuned with


def model_file(state: dict[str, Any], record: ModelRecord, figures: Figures | None) -> dict[str, Any]:
    """What torch.save writes as a model file: the state dict, the record and the figures (with the schema_version
    of the file) as JSON text."""
    metrics = {"schema_version": SCHEMA_VERSION, **figures.to_json()} if figures else {}
    return {"state_dict": state, "record_json": json.dumps(record.to_json()), "metrics_json": json.dumps(metrics)}


def read_model_file(obj: Any, path: str) -> tuple[ModelRecord, Figures | None]:
    """The record and figures of what torch.load read from a model file; RunFileError if it is not one."""
    try:
        record, metrics = json.loads(obj["record_json"]), json.loads(obj["metrics_json"])
    except (TypeError, KeyError, ValueError) as e:
        raise RunFileError(f"model file: {path} is not a prunetune model file (no {e})") from None
    return ModelRecord.from_json(record), (Figures.from_json(metrics) if metrics else None)


# --- final/summary.json ---

@dataclass(kw_only=True)
class BaseFigures(Timings):
    """The unpruned base model's figures."""

    flops: int  # as fvcore counts them
    params: int
    test: float  # the task's metric on the test split
    val: float  # the task's metric on the held-out split (the base was not trained on it if prunetune trained it)
    score: float  # its search score on the held-out split
    checkpoint: str  # the base checkpoint
    size_mb: float  # its state dict's size


@dataclass(kw_only=True)
class TaskInfo:
    """The run's task."""

    name: str  # model.task
    metric: str  # the primary metric: what the models are judged by
    metrics: list[str]  # every metric the task measures
    higher_is_better: bool  # of the primary metric


@dataclass(kw_only=True)
class FinetuneInfo:
    """The fine-tuning every finalist was planned to have."""

    epochs: int  # finetune.epochs
    scheduler: str  # finetune.scheduler


@dataclass(kw_only=True)
class Splits:
    """Images in the training split's parts the evaluation keeps apart."""

    heldout: int  # scored the candidates
    validation: int  # judged the finalists
    rest: int  # trained the weights


@dataclass(kw_only=True)
class SearchInfo:
    """What the search looked for and how many candidates it evaluated."""

    candidates: int  # evaluated and stored
    ok: int  # of them, evaluated without an error
    failed: int
    constraint: str  # flops, params or latency
    target: float | list[float]  # fraction of the base's; a range [low, high] or a list of budgets: a front
    tolerance: float  # the band around the target a candidate must land in
    limits: dict[str, float]  # other resources' limits, fractions of the base's


@dataclass(kw_only=True)
class LatencyInfo:
    """How latency was measured, and where the recommended model's time went."""

    threads: int | None  # latency.threads
    device: str  # latency.device
    runtime: str  # latency.runtime: torch, onnxruntime or openvino
    batch_size: int | None = None  # the latency table's batch (None: no table)
    table: str | None  # the latency table's key (None: no table)
    table_worst_error: float | None  # the table's worst relative error on its check points
    layers: list[dict[str, Any]] | None  # per layer: workers.latency.LayerCost's fields (None: no table)


@dataclass(kw_only=True)
class FrontCost:
    """A candidate's place on the front: its held-out score and costs, also as fractions of the base's."""

    candidate: int | None  # its index in the search (None: no candidate landed in the budget)
    source: str | None = None  # what proposed it (a search algorithm or a baseline rule)
    score: float | None = None  # its search score on the held-out split, before fine-tuning
    flops: int | None = None  # as fvcore counts them
    flops_ratio: float | None = None
    params: int | None = None
    params_ratio: float | None = None
    latency_predicted_ms: float | None = None  # the latency table's prediction (a run with a table only)
    latency_ratio: float | None = None


@dataclass(kw_only=True)
class FrontPoint(FrontCost):
    """One budget of a front: its best model (the first of its finalists in the final order), the baselines there."""

    point: int  # 1, 2, ...: `prunetune export RUN --point K`
    budget: float  # fraction of the base's
    tolerance: float  # half the band's width
    band: list[float]  # [low, high]: the fractions a candidate of this budget lands in
    rank: int | None = None  # its final model's rank (final/rankN.pt; None: no fine-tuned model)
    path: str | None = None  # that model file
    val: float | None = None  # the task's metric on the validation split, the kept epoch
    test: float | None = None  # the task's metric on the test split, the kept epoch
    baselines: dict[str, FrontCost] = field(default_factory=dict)  # each baseline rule's best at this budget


@dataclass(kw_only=True)
class Front:
    """The accuracy-vs-cost front of a run whose search.target is a range or a list of budgets."""

    constraint: str  # flops, params or latency: what the budgets limit
    points: list[FrontPoint]  # one per budget, rising


@dataclass(kw_only=True)
class Summary(RunFile):
    """A finished run's figures: the base, the final models in the recommended order, how they were found."""

    name: ClassVar[str] = SUMMARY
    schema_version: int = SCHEMA_VERSION  # 1 where absent: the layout before these types
    base: BaseFigures  # the unpruned model
    input: dict[str, Any] | None  # the input contract (None: a factory's data)
    task: TaskInfo
    finetune: FinetuneInfo
    splits: Splits  # of the training split
    device: str  # cpu or cuda: where the models were fine-tuned and scored
    granularity: str  # the pruning method
    search: SearchInfo
    latency: LatencyInfo
    sparsity: dict[str, Any] | None  # the method's sparsity training (method, values, lambda, epochs, histograms)
    final: list[FinalModel]  # the final models, the recommended first
    front: Front | None = None  # a run whose search.target is a range or a list of budgets (None: one budget)

    @property
    def metric(self) -> str:
        """The task's primary metric."""
        return self.task.metric

    @classmethod
    def from_json(cls, data: Any) -> Summary:
        """The summary in `data`; version 1 has the metric in its key names."""
        if _check_version(data, cls.name) == 1:
            metric, data = data.get("task", {}).get("metric", "accuracy"), dict(data)
            if isinstance(data.get("base"), dict):
                data["base"] = _unprefixed(data["base"], metric)  # its `metric` key is not a field: left out
            if isinstance(data.get("final"), list):
                data["final"] = [_unprefixed(f, metric) if isinstance(f, dict) else f for f in data["final"]]
        return _build(cls, data, cls.name)


def summary_path(run_path: str) -> str:
    """Where a run's summary is."""
    return os.path.join(run_path, SUMMARY)


def read_summary(run_path: str) -> Summary | None:
    """The run's summary (None if it has none yet)."""
    path = summary_path(run_path)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return Summary.from_json(_load(f, path))


def _load(f: typing.TextIO, path: str) -> Any:
    try:
        return json.load(f)
    except ValueError as e:
        raise RunFileError(f"{path}: not JSON ({str(e).splitlines()[0]})") from None


# --- manifest.json ---

@dataclass(kw_only=True)
class StoredParts:
    """The candidate store as the manifest records it, for resume to verify."""

    rows: int  # candidates stored
    parts: dict[str, str]  # result part file -> its sha256


@dataclass(kw_only=True)
class Manifest(RunFile):
    """A run's bookkeeping: which run it is, its stage, what it wrote, its stored candidates."""

    name: ClassVar[str] = MANIFEST
    schema_version: int = SCHEMA_VERSION  # 1 where absent: the layout before these types
    run_id: str = ""  # the run's identity (exports name it)
    config_hash: str = ""  # hash of the config keys a resume may not change
    created: float | None = None  # unix time
    updated: float | None = None
    stage: str | None = None  # search, finetune or done (None: no manifest)
    files: list[str] | None = None  # what the run wrote, relative paths (None: a run from before the list)
    candidates: StoredParts | None = None  # the stored candidates' parts (None: none committed yet)
    baselines: list[str] | None = None  # the baselines the run proposes (a resume proposes the same)
    epoch_timeout_s: float | None = None  # the fine-tuning stage's epoch limit in force


def manifest_path(run_path: str) -> str:
    """Where a run's manifest is."""
    return os.path.join(run_path, MANIFEST)


def read_manifest(run_path: str) -> Manifest | None:
    """The run's manifest (None if there is none); RunFileError for a manifest.json prunetune did not write."""
    path = manifest_path(run_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise RunFileError(f"output.dir: {path} is not a prunetune run manifest ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not {"run_id", "config_hash"} <= set(data):
        raise RunFileError(f"output.dir: {path} was not written by prunetune; choose another directory for the run")
    _check_version(data, path)
    return Manifest.from_json(data)


# --- exports.json ---

@dataclass(kw_only=True)
class Export:
    """A file `prunetune export` wrote."""

    run_id: str | None  # the run it was exported from
    sha256: str  # its checksum when written
    format: str  # pt, torchscript, onnx or int8
    rank: int  # the final model it is
    written: float  # unix time


@dataclass(kw_only=True)
class Exports(RunFile):
    """What `prunetune export` of the run wrote (not the run's own files): an export replaces only these."""

    name: ClassVar[str] = EXPORTS
    schema_version: int = SCHEMA_VERSION  # 1 where absent: the layout before these types
    files: dict[str, Export] = field(default_factory=dict)  # path relative to the run directory -> the export

    @classmethod
    def from_json(cls, data: Any) -> Exports:
        """The record in `data`; version 1 is the path -> export map itself."""
        if _check_version(data, cls.name) == 1:
            data = {"files": data}
        return _build(cls, data, cls.name)


def read_exports(run_path: str) -> Exports:
    """The run's export record (empty if there is none or it cannot be read: then no file counts as an export)."""
    try:
        with open(os.path.join(run_path, EXPORTS)) as f:
            return Exports.from_json(json.load(f))
    except (OSError, ValueError, RunFileError):
        return Exports()


def write(run_path: str, record: Summary | Manifest | Exports) -> None:
    """Write a run file into the run directory (atomic, durable): its summary, manifest or export record."""
    write_json(os.path.join(run_path, record.name), record.to_json(), durable=True)


RUN_FILES: dict[str, type[RunFile]] = {  # every run file's type, for the reference page
    SUMMARY: Summary, MANIFEST: Manifest, EXPORTS: Exports,
    "final/rankN.pt: record_json (exports carry it too)": ModelRecord, "final/rankN.pt: metrics_json": FinalModel,
    "final/candidate-N-<recipe hash>.pt: metrics_json": Refinetuned}
