"""Tune trainables: what a trial runs on a worker. Each wraps the `workers` pipeline, which needs no Ray.

A reused actor keeps one CandidateEvaluator per run in this process (module cache), so the base model and
the calibration/held-out tensors stay on the device across candidates.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from workers import CandidateEvaluator, build_model, finetune, load_data

_CACHE: dict = {}


def _setup_threads(payload: dict) -> None:
    torch.set_num_threads(max(1, int(payload["cpus_per_trial"])))


def _device(payload: dict) -> str:
    return "cuda" if payload["gpus_per_trial"] > 0 and torch.cuda.is_available() else "cpu"


def _base_model(payload: dict) -> torch.nn.Module:
    import ray

    spec = payload["model"]
    model = build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec["kwargs"])
    model.load_state_dict(ray.get(payload["base_state"][0]))  # nested ref: fetched once per process
    return model.eval()


def _data(payload: dict):
    key = ("data", repr(sorted(payload["data"].items())))
    if key not in _CACHE:
        _CACHE[key] = load_data(**payload["data"])
    return _CACHE[key]


def evaluator_for(payload: dict) -> CandidateEvaluator:
    """The process-wide evaluator of this run (built on the first candidate this process sees)."""
    key = ("evaluator", payload["run_id"])
    if key not in _CACHE:
        _CACHE[key] = CandidateEvaluator(_base_model(payload), payload["space"], _data(payload),
                                         payload["evaluation"], _device(payload), payload["criterion"])
    return _CACHE[key]


def _fault_delay() -> None:
    """Test-only: PRUNETUNE_FAULT_DELAY_S slows every candidate and every fine-tuning epoch."""
    delay = os.environ.get("PRUNETUNE_FAULT_DELAY_S")
    if delay:
        time.sleep(float(delay))


def _fault_hook(index: int) -> None:
    """Test-only faults: PRUNETUNE_FAULT_LOG gets a line per evaluation started; with PRUNETUNE_FAULT_CRASH_AT=k
    and PRUNETUNE_FAULT_DIR, candidate k kills its worker process once (os._exit)."""
    log = os.environ.get("PRUNETUNE_FAULT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{index}\n")
    _fault_delay()
    crash_at, marker_dir = os.environ.get("PRUNETUNE_FAULT_CRASH_AT"), os.environ.get("PRUNETUNE_FAULT_DIR")
    if crash_at is None or marker_dir is None or int(crash_at) != index:
        return
    marker = os.path.join(marker_dir, f"crashed-{index}")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def evaluate_candidate(config: dict, payload: dict) -> None:
    """Tune trainable of the search stage: evaluate one strategy and report its record."""
    import ray
    from ray import tune

    _setup_threads(payload)
    index = config["index"]
    _fault_hook(index)
    try:
        if os.environ.get("PRUNETUNE_FAULT_FAIL_AT") == str(index):  # test-only: an evaluation that raises
            raise RuntimeError("injected failure")
        record = evaluator_for(payload).evaluate(config["ratios"])
        record.update(status="ok", error=None)
    except Exception as e:  # recorded as a failed candidate; the search goes on
        record = {"status": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0][:500], "score": None}
    node = ray.get_runtime_context().get_node_id()[:12]
    tune.report({**record, "index": index, "ratios": list(config["ratios"]), "node": node})


def finetune_candidate(config: dict, payload: dict) -> None:
    """Tune trainable of the fine-tuning stage: prune, recalibrate, fine-tune; report and checkpoint each epoch."""
    from ray import tune

    _setup_threads(payload)
    candidate = payload["finalists"][config["rank"] - 1]
    evaluator = evaluator_for(payload)
    model = evaluator.prune(candidate["ratios"])
    evaluator.recalibrate(model)
    model = model.float().to(memory_format=torch.contiguous_format)
    workdir = tempfile.mkdtemp(prefix="prunetune-ft-")
    ckpt = os.path.join(workdir, "finetune.pt")
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            shutil.copy(os.path.join(d, "finetune.pt"), ckpt)

    def report(epoch: int, metrics: dict, path: str | None) -> None:
        _fault_delay()
        metrics = {**metrics, "index": candidate["index"], "rank": config["rank"]}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(workdir))

    teacher = evaluator.base if payload["finetune"].distill_weight > 0 else None
    try:
        finetune(model, _data(payload), payload["finetune"], evaluator.device, ckpt, teacher=teacher,
                 on_epoch=report, train_indices=evaluator.rest_indices, val_indices=evaluator.heldout_indices)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
