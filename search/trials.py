"""Tune trainables: what a trial runs on a worker. Each wraps the `workers` pipeline, which needs no Ray.

A reused actor keeps one CandidateEvaluator per run in this process (module cache), so the base model and
the calibration/held-out tensors stay on the device across candidates.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch

from prunetune.workers.data import load_data
from prunetune.workers.evaluator import CandidateEvaluator
from prunetune.workers.methods import PruningMethod
from prunetune.workers.finetune import CHECKPOINT_NAME, FinetuneOptions, finetune
from prunetune.workers.models import build_model
from prunetune.workers.record import CandidateRecord
from prunetune.workers.settings import EvaluationSettings, FinetuneSettings
from prunetune.workers.space import PruningSpace
from prunetune.workers.tasks import resolve_task


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
    evaluation: EvaluationSettings
    finetune: FinetuneSettings
    criterion: str
    method: PruningMethod  # search.granularity's method, itself: a method registered only in the driver works too
    cpus_per_trial: float
    gpus_per_trial: float
    finalists: list[CandidateRecord] = field(default_factory=list)  # the fine-tuning stage's candidates, best first
    num_workers: int = 0  # processes reading training images from files in the fine-tuning stage
    task: str = "classification"  # model.task, resolved in the worker (a user's task module imports there)
    workers_per_finalist: int = 1  # > 1: each finalist fine-tunes as a Ray Train TorchTrainer of that many workers

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
                                         payload.evaluation, payload.device, payload.criterion, payload.method,
                                         resolve_task(payload.task))
    return _CACHE[key]


def evaluate_candidates(config: dict, payload: TrialPayload) -> None:
    """Tune trainable of the search stage: evaluate config["candidates"] (a batch of `Candidate`s), reporting each
    record as it is done."""
    import ray
    from ray import tune

    torch.set_num_threads(max(1, int(payload.cpus_per_trial)))
    node = ray.get_runtime_context().get_node_id()[:12]
    for candidate in config["candidates"]:
        time_base = None
        try:
            evaluator = evaluator_for(payload)
            record = evaluator.evaluate(list(candidate.ratios), candidate.index)
            record.source, time_base = candidate.source, evaluator.time_base
        except Exception as e:  # recorded as a failed candidate; the search goes on
            record = candidate.failed(f"{type(e).__name__}: {e}")
        record.node = node
        check_latency(record, candidate.latency_budget_ms, payload.space, time_base)
        if payload.gpus_per_trial > 0 and record.device == "cpu":
            record.warning = "; ".join(filter(None, [record.warning, "the trial holds a Ray GPU but this node has no "
                                                                      "CUDA device: evaluated on the CPU"]))
        tune.report(record.to_dict())


def check_latency(record: CandidateRecord, budget_ms: float | None, space: PruningSpace,
                  time_base: Callable[[], float] | None = None) -> None:
    """Mark a candidate timed over its latency budget by more than the latency table's worst fit error: it is
    stored, but never kept for fine-tuning. One timed over it is judged again against the base timed now
    (`time_base`): on a machine slower now than when the table was built, the budget slows alike, so a load does
    not move every candidate out of its budget. A candidate within it costs no second timing."""
    if record.latency_ms is None or budget_ms is None:
        return
    table = space.latency
    allowed, now = budget_ms * (1 + table.worst_error), ""
    if record.latency_ms > allowed and time_base is not None and table.base_ms:
        base_ms = time_base()
        if base_ms > table.base_ms:
            allowed *= base_ms / table.base_ms
            now = f", the base timed {base_ms:.2f} ms now ({table.base_ms:.2f} in the table)"
    record.within_budget = record.latency_ms <= allowed
    if not record.within_budget:
        record.warning = "; ".join(filter(None, [record.warning, f"timed at {record.latency_ms:.2f} ms, over the "
                                                 f"latency budget ({allowed:.2f} ms with the table's error{now})"]))


def finetune_candidate(config: dict, payload: TrialPayload) -> None:
    """Tune trainable of the fine-tuning stage: prune, recalibrate, fine-tune; report and checkpoint each epoch. With
    finetune.workers_per_finalist > 1 the finalist trains as a Ray Train TorchTrainer of that many DDP workers."""
    from ray import tune

    if payload.workers_per_finalist > 1:
        return _finetune_data_parallel(config, payload, tune.get_checkpoint())

    def report(metrics: dict, workdir: str) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(workdir))

    _finetune_finalist(config["rank"], payload, tune.get_checkpoint(), report)


def _finetune_finalist(rank: int, payload: TrialPayload, restored, report, data_parallel: bool = False) -> None:
    """Fine-tune finalist `rank` in this process, from the `restored` checkpoint if any; `report(metrics, workdir)`
    after each epoch (workdir holds the epoch's checkpoint)."""
    torch.set_num_threads(max(1, int(payload.cpus_per_trial)))
    candidate = payload.finalists[rank - 1]
    evaluator = evaluator_for(payload)
    model = evaluator.prune(candidate.ratios)
    evaluator.recalibrate(model)
    model = model.float().to(memory_format=torch.contiguous_format)
    workdir = tempfile.mkdtemp(prefix="prunetune-ft-")
    ckpt = os.path.join(workdir, CHECKPOINT_NAME)
    if restored is not None:
        with restored.as_directory() as d:
            shutil.copy(os.path.join(d, CHECKPOINT_NAME), ckpt)
    teacher = evaluator.base if payload.finetune.distill_weight > 0 else None
    try:
        finetune(model, _data(payload), payload.finetune, FinetuneOptions(
            device=evaluator.device, train_indices=evaluator.rest_indices, val_indices=evaluator.validation_indices,
            checkpoint_path=ckpt, teacher=teacher, stage=f"fine-tuning finalist {rank}", task=evaluator.task,
            num_workers=payload.num_workers, data_parallel=data_parallel,
            log=io.StringIO() if data_parallel and torch.distributed.get_rank() > 0 else None,  # rank 0 speaks
            on_epoch=lambda epoch, metrics, path: report({**metrics, "index": candidate.index, "rank": rank},
                                                         workdir)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _finetune_worker(loop_config: dict) -> None:
    """A Ray Train worker of a data-parallel finalist: its share of each epoch; rank 0's report holds the checkpoint."""
    import ray.train

    def report(metrics: dict, workdir: str) -> None:
        context = ray.train.get_context()
        checkpoint = ray.train.Checkpoint.from_directory(workdir) if context.get_world_rank() == 0 else None
        ray.train.report({**metrics, "workers": context.get_world_size()}, checkpoint=checkpoint)

    _finetune_finalist(loop_config["rank"], loop_config["payload"], loop_config["restored"], report,
                       data_parallel=True)


def _finetune_data_parallel(config: dict, payload: TrialPayload, restored) -> None:
    """Run finalist config["rank"] as a TorchTrainer of finetune.workers_per_finalist workers (gloo on CPU, NCCL on
    GPU); each epoch's metrics and rank 0's checkpoint are passed on to this Tune trial as they are reported."""
    import threading

    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    class ToTune(ray.train.UserCallback):
        """Runs in the Train controller: hands each report to the Tune trial through a queue."""

        def __init__(self, reports):
            self.reports = reports

        def after_report(self, run_context, metrics, checkpoint):
            self.reports.put((metrics[0], checkpoint))

    reports = Queue(actor_options={"num_cpus": 0})
    storage = tune.get_context().get_storage()  # Train's own copies of the checkpoints go next to the trial's
    relay = os.path.join(storage.trial_fs_path, "train")
    _delete_dir(storage.storage_filesystem, relay)  # a killed run's: its state is not what this trial resumes from
    trainer = TorchTrainer(
        _finetune_worker, train_loop_config={"rank": config["rank"], "payload": payload, "restored": restored},
        scaling_config=ray.train.ScalingConfig(
            num_workers=payload.workers_per_finalist, use_gpu=payload.gpus_per_trial > 0,
            resources_per_worker={"CPU": payload.cpus_per_trial, "GPU": payload.gpus_per_trial}),
        run_config=ray.train.RunConfig(name=os.path.basename(relay), storage_path=os.path.dirname(relay),
                                       storage_filesystem=storage.storage_filesystem, callbacks=[ToTune(reports)],
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
    failure = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # raised again in the trial
            failure.append(e)
        finally:
            reports.put(None)

    threading.Thread(target=fit, daemon=True).start()
    while (item := reports.get()) is not None:
        tune.report(item[0], checkpoint=item[1])
    _delete_dir(storage.storage_filesystem, relay)
    if failure:
        raise failure[0]


def _delete_dir(filesystem, path: str) -> None:
    try:
        filesystem.delete_dir(path)
    except FileNotFoundError:
        pass
