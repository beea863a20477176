"""Tune trainables: what a trial runs on a worker. Each wraps the `workers` pipeline, which needs no Ray.

A reused actor keeps one CandidateEvaluator per run in this process (module cache), so the base model and
the calibration/held-out tensors stay on the device across candidates.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

from prunetune.workers.data import load_data
from prunetune.workers.evaluator import CandidateEvaluator
from prunetune.workers.methods import PruningMethod
from prunetune.workers.finetune import CHECKPOINT_NAME, finetune
from prunetune.workers.models import build_model
from prunetune.workers.record import CandidateRecord
from prunetune.workers.space import PruningSpace

from .config import EvaluationConfig, FinetuneConfig

_CACHE: dict = {}


@dataclass
class TrialPayload:
    """What every trial of a run receives through the object store (the base weights as a nested reference)."""

    run_id: str
    model: dict  # build_model arguments of the base architecture
    base_state: list  # [ObjectRef of the base state dict]: nested, so a worker fetches it once
    space: PruningSpace
    evaluation_data: list  # [ObjectRef of the EvaluationData]: one read-only copy per node
    data: dict  # load_data arguments (the fine-tuning stage trains on the data set)
    evaluation: EvaluationConfig
    finetune: FinetuneConfig
    criterion: str
    method: PruningMethod  # search.granularity's method, itself: a method registered only in the driver works too
    cpus_per_trial: float
    gpus_per_trial: float
    finalists: list[CandidateRecord] = field(default_factory=list)  # the fine-tuning stage's candidates, best first
    latency_budget_ms: float | None = None  # the search's latency bound, when a budget names latency
    num_workers: int = 0  # processes reading training images from files in the fine-tuning stage

    @property
    def device(self) -> str:
        """cuda when the trial holds a GPU and this node has one, else cpu (the record's warning says so)."""
        return "cuda" if self.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu"


def _data(payload: TrialPayload):
    key = ("data", repr(sorted(payload.data.items())))
    if key not in _CACHE:
        _CACHE[key] = load_data(**payload.data)
    return _CACHE[key]


def evaluator_for(payload: TrialPayload) -> CandidateEvaluator:
    """The process-wide evaluator of this run (built on the first candidate this process sees)."""
    import ray

    key = ("evaluator", payload.run_id)
    if key not in _CACHE:
        model = build_model(**payload.model)
        model.load_state_dict(ray.get(payload.base_state[0]))
        _CACHE[key] = CandidateEvaluator(model.eval(), payload.space, ray.get(payload.evaluation_data[0]),
                                         payload.evaluation, payload.device, payload.criterion, payload.method)
    return _CACHE[key]


def evaluate_candidates(config: dict, payload: TrialPayload) -> None:
    """Tune trainable of the search stage: evaluate a batch of strategies, reporting each record as it is done."""
    import ray
    from ray import tune

    torch.set_num_threads(max(1, int(payload.cpus_per_trial)))
    node = ray.get_runtime_context().get_node_id()[:12]
    for candidate in config["candidates"]:
        index, ratios = candidate["index"], candidate["ratios"]
        try:
            record = evaluator_for(payload).evaluate(ratios, index)
        except Exception as e:  # recorded as a failed candidate; the search goes on
            record = CandidateRecord.failed(index, ratios, f"{type(e).__name__}: {e}")
        record.node, record.source = node, candidate["source"]
        check_latency(record, payload)
        if payload.gpus_per_trial > 0 and record.device == "cpu":
            record.warning = "; ".join(filter(None, [record.warning, "the trial holds a Ray GPU but this node has no "
                                                                      "CUDA device: evaluated on the CPU"]))
        tune.report(record.to_dict())


def check_latency(record: CandidateRecord, payload: TrialPayload) -> None:
    """Mark a candidate timed over the latency budget by more than the latency table's worst fit error: it is
    stored, but never kept for fine-tuning."""
    if record.latency_ms is None or payload.latency_budget_ms is None:
        return
    allowed = payload.latency_budget_ms * (1 + payload.space.latency.worst_error)
    record.within_budget = record.latency_ms <= allowed
    if not record.within_budget:
        record.warning = "; ".join(filter(None, [record.warning, f"timed at {record.latency_ms:.2f} ms, over the "
                                                 f"latency budget ({allowed:.2f} ms with the table's error)"]))


def finetune_candidate(config: dict, payload: TrialPayload) -> None:
    """Tune trainable of the fine-tuning stage: prune, recalibrate, fine-tune; report and checkpoint each epoch."""
    from ray import tune

    torch.set_num_threads(max(1, int(payload.cpus_per_trial)))
    candidate = payload.finalists[config["rank"] - 1]
    evaluator = evaluator_for(payload)
    model = evaluator.prune(candidate.ratios)
    evaluator.recalibrate(model)
    model = model.float().to(memory_format=torch.contiguous_format)
    workdir = tempfile.mkdtemp(prefix="prunetune-ft-")
    ckpt = os.path.join(workdir, CHECKPOINT_NAME)
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            shutil.copy(os.path.join(d, CHECKPOINT_NAME), ckpt)

    def report(epoch: int, metrics: dict, path: str | None) -> None:
        metrics = {**metrics, "index": candidate.index, "rank": config["rank"]}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(workdir))

    teacher = evaluator.base if payload.finetune.distill_weight > 0 else None
    try:
        finetune(model, _data(payload), payload.finetune, evaluator.device, ckpt, teacher=teacher,
                 on_epoch=report, train_indices=evaluator.rest_indices, val_indices=evaluator.heldout_indices,
                 stage=f"fine-tuning finalist {config['rank']}", num_workers=payload.num_workers)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
