"""The search driver: prepare the base model and space, run the search and fine-tuning stages on Ray Tune."""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from workers import DataBundle, PrunePlan, load_data
from workers.data import heldout_split
from workers.models import build_model, check_model_name

from .artifacts import base_model, model_spec, pruned_record, save_pruned
from .config import Config, ConfigError, expand
from .rundir import RunDir
from .sampler import StrategySampler
from .space import PruningSpace
from .store import CandidateStore


class SearchFailed(RuntimeError):
    """The search stopped without a usable result (e.g. too many failed candidates)."""


@dataclass
class Prepared:
    """Everything the driver builds once before Ray: data, base model, space, sampler."""

    cfg: Config
    data: DataBundle
    model: nn.Module
    base_checkpoint: str
    space: PruningSpace
    sampler: StrategySampler
    spec: dict


def data_kwargs(cfg: Config) -> dict:
    """load_data arguments for this config, with absolute paths (trials may run elsewhere)."""
    d = cfg.data
    return {"name": d.name, "path": os.path.abspath(expand(d.path)) if d.path else None,
            "image_size": d.image_size, "num_classes": d.num_classes, "train_size": d.train_size,
            "test_size": d.test_size, "seed": d.seed, "cache_dir": expand(cfg.output.cache_dir),
            "kwargs": dict(d.kwargs)}


def prepare(cfg: Config, log=None) -> Prepared:
    """Validate every input against the real model and data; train or load the base model."""
    check_model_name(cfg.model.name)
    data = load_data(**data_kwargs(cfg))
    heldout_split(len(data.train), cfg.evaluation.heldout_size, cfg.evaluation.seed)
    spec = model_spec(cfg, data.num_classes, data.input_shape[0])
    skeleton = build_model(**spec)  # architecture only: bad targets fail before any training
    space = PruningSpace.from_model(skeleton, data.example_input(), cfg.search.round_to, cfg.model.ignored_layers)
    s = cfg.search
    sampler = StrategySampler(space, s.flops_target, s.tolerance, s.max_ratio, s.seed)
    model, checkpoint = base_model(cfg, data, log)
    return Prepared(cfg, data, model, checkpoint, space, sampler, spec)


def connect(cfg: Config, address: str | None = None) -> bool:
    """Connect to the configured Ray cluster, or start an embedded one; True if this call started Ray."""
    import ray

    quiet_tune()
    if ray.is_initialized():
        return False
    address = address or cfg.ray.address
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, dashboard_host=cfg.ray.dashboard_host,
                 log_to_driver=False)
    return True


def quiet_tune() -> None:
    """Tune settings for many short trials: no per-trial result files, no snapshot-rate warnings."""
    import logging

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.tune.analysis.experiment_analysis", "ray.tune.tune", "ray.tune.execution.experiment_state"):
        logging.getLogger(name).setLevel(logging.ERROR)


def check_resources(cfg: Config) -> None:
    """Refuse GPU trials on a cluster without GPUs (instead of pending forever)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    want = cfg.resources.gpus_per_trial
    if want > 0 and gpus < want and not cfg.resources.wait_for_gpus:
        raise ConfigError(f"resources.gpus_per_trial: {want} GPU per trial, but the Ray cluster has {gpus:g} GPU; "
                          "set it to 0 for CPU trials (or resources.wait_for_gpus: true if GPU nodes autoscale)")


def payload(prep: Prepared, run_id: str, finalists: list[dict] | None = None) -> dict:
    """What every trial receives through the object store (the base weights as a nested reference)."""
    import ray

    cfg = prep.cfg
    state = {k: v.detach().cpu() for k, v in prep.model.state_dict().items()}
    return {"run_id": run_id, "model": prep.spec, "base_state": [ray.put(state)], "space": prep.space,
            "data": data_kwargs(cfg), "evaluation": cfg.evaluation, "finetune": cfg.finetune,
            "criterion": cfg.search.criterion, "cpus_per_trial": cfg.resources.cpus_per_trial,
            "gpus_per_trial": cfg.resources.gpus_per_trial, "finalists": finalists or []}


def _trainable(fn, prep: Prepared, run_id: str, finalists: list[dict] | None = None):
    from ray import tune

    r = prep.cfg.resources
    return tune.with_resources(tune.with_parameters(fn, payload=payload(prep, run_id, finalists)),
                               {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial})


def _candidate_dirname(trial) -> str:
    return f"cand-{trial.config.get('index', 0):06d}-{trial.trial_id}"


def _finalist_dirname(trial) -> str:
    return f"rank{trial.config.get('rank', 0)}-{trial.trial_id}"


def failure_verdict(rows: list[dict], cfg: Config) -> str | None:
    """A message if no candidate succeeded or the failed fraction exceeds search.max_failed_fraction."""
    failed = [r for r in rows if r["status"] != "ok"]
    if rows and len(failed) / len(rows) > cfg.search.max_failed_fraction or len(failed) == len(rows):
        last = failed[-1]["error"] if failed else "no candidate was evaluated"
        return (f"search stopped: {len(failed)} of {len(rows)} candidates failed (search.max_failed_fraction="
                f"{cfg.search.max_failed_fraction}); last error: {last}")
    return None


def run_search(prep: Prepared, run: RunDir, restore: bool) -> list[dict]:
    """Stage 1: evaluate candidates as Tune trials; return the stored rows."""
    from ray import tune

    from .trials import evaluate_candidate
    from .tune_search import FailureStopper, ResumableLimiter, StoreCallback, StrategySearcher, TopKScheduler

    cfg = prep.cfg
    s = cfg.search
    quiet_tune()
    path = os.path.join(run.tune_path, "search")
    trainable = _trainable(evaluate_candidate, prep, run.manifest().get("run_id", "run"))
    if restore and tune.Tuner.can_restore(path):
        print(f"[search] restoring the Tune experiment in {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=False, resume_errored=False)
    else:
        shutil.rmtree(path, ignore_errors=True)
        minimum = min(s.num_candidates, max(4, s.num_candidates // 10))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ResumableLimiter(StrategySearcher(prep.sampler, s.num_candidates, run.path),
                                            s.max_concurrent_trials),
                scheduler=TopKScheduler(s.top_k, run.path), num_samples=-1, reuse_actors=True,
                trial_dirname_creator=_candidate_dirname, time_budget_s=s.time_budget_s),
            run_config=tune.RunConfig(
                name="search", storage_path=run.tune_path, verbose=0,
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                callbacks=[StoreCallback(run.path, s.num_candidates)],
                stop=FailureStopper(s.max_failed_fraction, minimum)))
    tuner.fit()
    store = CandidateStore(run.path)
    store.compact()
    rows = store.rows()
    verdict = failure_verdict(rows, cfg)
    if verdict:
        raise SearchFailed(verdict)
    return rows


def finalists(rows: list[dict], k: int) -> list[dict]:
    """The k best successful candidates by score, as the fine-tuning stage receives them."""
    from .tune_search import rank_key

    ok = sorted((r for r in rows if r["status"] == "ok"), key=rank_key)[:k]
    return [{"rank": i + 1, "index": r["index"], "ratios": r["ratios"], "score": r["score"],
             "flops": r["flops"], "flops_ratio": r["flops_ratio"], "params": r["params"]} for i, r in enumerate(ok)]


def run_finetune(prep: Prepared, run: RunDir, top: list[dict], restore: bool):
    """Stage 2: fine-tune the finalists in parallel (ASHA or FIFO); return Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .trials import finetune_candidate
    from .tune_search import FinetuneProgress

    cfg = prep.cfg
    f = cfg.finetune
    quiet_tune()
    path = os.path.join(run.tune_path, "finetune")
    trainable = _trainable(finetune_candidate, prep, run.manifest().get("run_id", "run"), top)
    if restore and tune.Tuner.can_restore(path):
        print(f"[finetune] restoring the Tune experiment in {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
        scheduler = (ASHAScheduler(time_attr="epoch", metric="val_accuracy", mode="max", max_t=f.epochs,
                                   grace_period=min(f.grace_epochs, f.epochs), reduction_factor=3)
                     if f.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space={"rank": tune.grid_search([c["rank"] for c in top])},
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=cfg.search.max_concurrent_trials,
                                        reuse_actors=True, trial_dirname_creator=_finalist_dirname),
            run_config=tune.RunConfig(name="finetune", storage_path=run.tune_path, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      callbacks=[FinetuneProgress()]))
    print(f"[finetune] fine-tuning the top {len(top)} for up to {f.epochs} epochs ({f.scheduler})", flush=True)
    return tuner.fit()


def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 20) -> float:
    """Median forward latency in milliseconds on the example batch (after warm-up)."""
    model.eval()
    device = next(model.parameters()).device
    example = example.to(device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(example)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def finalize(prep: Prepared, run: RunDir, top: list[dict], grid, rows: list[dict]) -> dict:
    """Write final/rankN.pt (best validation accuracy first), final/summary.json and report.md."""
    from .report import write_report
    from workers.scoring import score
    from workers.data import iterate_batches

    by_rank = {c["rank"]: c for c in top}
    outcomes = []
    for result in grid:
        rank = result.config.get("rank")
        if rank not in by_rank or result.checkpoint is None:
            continue
        with result.checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "finetune.pt"), map_location="cpu", weights_only=True)
        outcomes.append((by_rank[rank], result.metrics, state["model"]))
    if not outcomes:
        raise SearchFailed("fine-tuning produced no model (every fine-tuning trial failed)")
    outcomes.sort(key=lambda o: (-o[1].get("val_accuracy", 0.0), -o[0]["score"]))
    os.makedirs(run.final_path, exist_ok=True)
    plan = PrunePlan(prep.model, prep.space, prep.cfg.search.criterion)
    example = prep.data.example_input()
    base_test = score(prep.model, iterate_batches(prep.data.test, range(len(prep.data.test)), 500))
    finals = []
    for place, (cand, metrics, state) in enumerate(outcomes, 1):
        model = plan.apply(cand["ratios"])
        model.load_state_dict(state)
        record = pruned_record(prep.spec, prep.space, cand["ratios"], prep.cfg.search.criterion,
                               prep.base_checkpoint)
        entry = {"rank": place, "candidate": cand["index"], "search_rank": cand["rank"],
                 "adaptive_bn_score": cand["score"], "val_accuracy": metrics.get("val_accuracy"),
                 "test_accuracy": metrics.get("test_accuracy"), "epochs": metrics.get("epoch"),
                 "flops": record["flops"], "flops_ratio": record["flops"] / prep.space.base_flops,
                 "params": record["params"], "latency_ms_batch1": latency_ms(model, example),
                 "path": os.path.join(run.final_path, f"rank{place}.pt")}
        save_pruned(entry["path"], model, record, entry)
        finals.append(entry)
    summary = {"base": {"flops": prep.space.base_flops, "params": prep.space.base_params,
                        "test_accuracy": base_test["accuracy"], "checkpoint": prep.base_checkpoint,
                        "latency_ms_batch1": latency_ms(prep.model, example)},
               "device": "cuda" if next(prep.model.parameters()).is_cuda else "cpu",
               "search": {"candidates": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
                          "failed": sum(r["status"] != "ok" for r in rows),
                          "flops_target": prep.cfg.search.flops_target, "tolerance": prep.cfg.search.tolerance},
               "final": finals}
    write_report(run, summary, rows, top)
    return summary


def launch(prep: Prepared, run: RunDir, address: str | None, restore: bool, overwrite: bool = False) -> dict:
    """Take the run lock, connect to Ray (or start it), run or continue both stages, and let go of both."""
    run.acquire()
    started = False
    try:
        if not restore:
            run.create(prep.cfg, overwrite)
        started = connect(prep.cfg, address)
        check_resources(prep.cfg)
        return execute(prep, run, restore)
    finally:
        run.release()
        if started:
            import ray

            ray.shutdown()


def execute(prep: Prepared, run: RunDir, restore: bool) -> dict:
    """Run (or continue) both stages as the manifest says, then write the final models and report."""
    store = CandidateStore(run.path)
    stage = run.manifest().get("stage", "search")
    if stage == "search":
        rows = run_search(prep, run, restore)
        run.update(stage="finetune", candidates=store.manifest())
        restore = False  # the fine-tuning stage has not started yet
        time.sleep(float(os.environ.get("PRUNETUNE_FAULT_PAUSE_BETWEEN_STAGES_S", "0")))  # test-only window
    rows = store.rows()
    top = finalists(rows, prep.cfg.search.top_k)
    grid = run_finetune(prep, run, top, restore)
    summary = finalize(prep, run, top, grid, rows)
    run.update(stage="done", candidates=store.manifest())
    return summary
