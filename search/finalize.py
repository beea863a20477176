"""The end of a run: final models (the recommended first: see ranked), their summary, and the report."""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from prunetune.workers.data import iterate_batches
from prunetune.workers.errors import RunFailed
from prunetune.workers.finetune import load_finetuned
from prunetune.workers.latency import where_time_went
from prunetune.workers.methods import METHODS
from prunetune.workers.prune import clone_module
from prunetune.workers.record import CandidateRecord
from prunetune.workers.scoring import score
from prunetune.workers.selection import margin, tied
from prunetune.workers.splits import splits_of
from prunetune.workers.tasks import search_score
from prunetune.workers.timing import ROUNDS, RUNTIMES, Timing, interleaved

from .artifacts import pruned_record, save_pruned
from .config import Config, budgets, front
from .front import front_summary
from .prepare import Prepared
from .report import report_files, write_report
from .rundir import RunDir
from .runfiles import (BaseFigures, FinalModel, FinetuneInfo, LatencyInfo, SearchInfo, Splits, Summary, TaskInfo,
                       Timings)


class NoFinalModel(RunFailed, RuntimeError):
    """Fine-tuning produced no model."""


def first_failure(grid) -> str:
    """`; finalist N: Cause: its first line` for the best-ranked finalist whose fine-tuning raised (a Ray task error
    names the worker's own exception), else ''."""
    failed = sorted((r for r in grid if r.error is not None), key=lambda r: r.config.get("rank") or float("inf"))
    if not failed:
        return ""
    error = getattr(failed[0].error, "cause", None) or failed[0].error
    line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    rank = failed[0].config.get("rank")
    return f"; finalist {rank if rank else '?'}: {type(error).__name__}: {line}"[:400]


def state_dict_mb(model: nn.Module) -> float:
    """Size of the model's state dict as torch.save writes it, in MiB."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2 ** 20


def layer_costs(prep: Prepared, ratios) -> list[dict] | None:
    """Where the recommended model's time went, per layer, as the latency table predicts it (None without a table):
    what report.md's "Where the time went" shows."""
    table = prep.space.latency
    if table is None:
        return None
    kept = prep.space.kept_batch(np.asarray(ratios, dtype=np.float64)[None])[0]
    return [dataclasses.asdict(c) for c in where_time_went(table, prep.space, kept)]


def timings(models: list[tuple[nn.Module, Any]], prep: Prepared) -> list[Timings]:
    """Each (model, strategy) pair's latency at batch 1 (median and spread), its throughput batch's latency, and with
    a latency table its latency at the table's batch next to the table's prediction (strategy None: the base), all
    timed in latency.runtime with the configured threads, in interleaved rounds: a load spike lands on every model
    alike, so their ratios hold."""
    lat, table, space = prep.cfg.latency, prep.space.latency, prep.space
    deployed = [METHODS[prep.cfg.search.granularity].deployable(clone_module(m, {})) for m, _ in models]
    device = next(deployed[0].parameters()).device
    runtime = lat.runtime if device.type == "cpu" or not RUNTIMES[lat.runtime].cpu_only else "torch"

    def at(batch: int, repeats: int, threads: int | None = lat.threads) -> list[Timing]:
        x = space.example_input(batch).to(device)
        return interleaved([(m, x) for m in deployed], repeats, threads, runtime)

    ones, manys = at(1, lat.repeats), at(lat.throughput_batch_size, max(ROUNDS, lat.repeats // 4))
    budget: list[Timing | None] = [None] * len(models)
    predicted: list[float | None] = [None] * len(models)
    if table is not None:  # the table's key holds latency.threads and repeats: at batch 1 it is the batch-1 timing
        budget = list(ones if table.batch_size == 1 else at(table.batch_size, table.repeats, table.threads))
        full = np.zeros(len(space.groups))
        predicted = [float(table.predict(space, space.kept_batch(
            np.asarray(full if r is None else r, dtype=np.float64)[None]))[0]) for _, r in models]
    return [Timings(latency_ms_batch1=one.median_ms, latency_iqr_ms=one.iqr_ms,
                    throughput_batch=lat.throughput_batch_size, latency_ms_throughput=many.median_ms,
                    images_per_s=1000.0 * lat.throughput_batch_size / many.median_ms,
                    latency_ms_budget_batch=b.median_ms if b else None, latency_predicted_ms=p)
            for one, many, b, p in zip(ones, manys, budget, predicted)]


def budget_cost(record: CandidateRecord, constraint: str) -> float:
    """What the search's budget counts of a candidate (search.constraint): its FLOPs, params, or predicted latency
    (its FLOPs where no prediction was stored)."""
    value = getattr(record, {"flops": "flops", "params": "params", "latency": "latency_predicted_ms"}[constraint])
    return float(record.flops if value is None else value)


def over_latency_budget(cfg: Config, base: Timings, finals: list[Timings]) -> list[bool]:
    """Per final model, whether timed at the latency table's batch it is over a latency budget: the search's latency
    target plus its tolerance (of the base's time, timed beside it; a single target, not a front's), or a latency
    limit (a fraction, or milliseconds); all False without one."""
    base_ms = base.latency_ms_budget_batch
    bounds = [(cfg.search.target + cfg.search.tolerance, False)] \
        if cfg.search.constraint == "latency" and not front(cfg) else []
    bounds += [(b.value, b.absolute) for b in budgets(cfg) if b.name == "latency"]
    return [bool(base_ms and t.latency_ms_budget_batch and any(
        t.latency_ms_budget_batch > value if absolute else t.latency_ms_budget_batch / base_ms > value
        for value, absolute in bounds)) for t in finals]


def ranked(outcomes: list, metric: str, n: int, higher_is_better: bool = True, constraint: str = "flops",
           over: frozenset[int] = frozenset()) -> tuple[list, int]:
    """Finalists (candidate, search rank, metrics, state) in their final order, and how many lead it tied with the
    best validation figure (selection.tied on n images): fine-tuned before one left at epoch 0, then the cheaper in
    what the budget counts (`budget_cost`). The others follow by validation figure; a finalist without a figure comes
    last. Candidates in `over` (timed over a latency budget) follow those within it, unless none is within."""
    within = [o for o in outcomes if o[0].index not in over]
    if within and len(within) < len(outcomes):
        order, lead = ranked(within, metric, n, higher_is_better, constraint)
        return order + ranked([o for o in outcomes if o[0].index in over], metric, n, higher_is_better,
                              constraint)[0], lead
    sign = 1 if higher_is_better else -1
    val = lambda o: o[2].get(f"best_val_{metric}")  # noqa: E731
    by_val = sorted(outcomes, key=lambda o: (val(o) is None, -sign * (val(o) or 0.0), -o[0].score))
    close = [_tied(val(by_val[0]), val(o), metric, n) for o in by_val]
    lead = sorted((o for o, c in zip(by_val, close) if c),
                  key=lambda o: (not o[2].get("best_epoch"), budget_cost(o[0], constraint)))
    return lead + [o for o, c in zip(by_val, close) if not c], len(lead)


def _tied(best: float | None, value: float | None, metric: str, n: int) -> bool:
    return best is not None and value is not None and tied(best, value, metric, n)


def _margin(metric: str, value: float | None, n: int) -> float | None:
    return None if value is None else margin(metric, value, n)


def finetuned(metric: str, metrics: dict) -> dict:
    """A fine-tuning trial's last result (Tune's metrics) as the fields of a model's Figures it gives."""
    return {"metric": metric, "val_before_finetune": metrics.get(f"start_val_{metric}"),
            "val": metrics.get(f"best_val_{metric}"), "test": metrics.get(f"best_test_{metric}"),
            "epochs": metrics.get("epoch"), "kept_epoch": metrics.get("best_epoch")}


def finalize(prep: Prepared, run: RunDir, top: list[CandidateRecord], grid,
             records: list[CandidateRecord]) -> Summary:
    """Write final/rankN.pt (in `ranked` order), the summary and report.md; the summary."""
    cfg = prep.cfg
    outcomes = []
    for result in grid:
        rank = result.config.get("rank")
        if not rank or rank > len(top) or result.checkpoint is None:
            continue
        with result.checkpoint.as_directory() as d:
            outcomes.append((top[rank - 1], rank, result.metrics, load_finetuned(d)))
    if not outcomes:
        raise NoFinalModel(f"fine-tuning produced no model (every fine-tuning trial failed{first_failure(grid)})")
    task = prep.task
    metric = task.metric
    splits = splits_of(len(prep.data.train), cfg.evaluation.settings())
    n = len(splits.validation)
    pruner = METHODS[cfg.search.granularity].plan(prep.model, prep.space, cfg.search.criterion, cfg.evaluation.seed)
    models = {}
    for cand, _, _, state in outcomes:
        models[cand.index] = pruner.apply(cand.ratios)
        models[cand.index].load_state_dict(state)
    base_timings, *timed = timings([(prep.model, None), *((models[o[0].index], o[0].ratios) for o in outcomes)], prep)
    final_timings = {o[0].index: t for o, t in zip(outcomes, timed)}
    over = frozenset(o[0].index for o, is_over in zip(outcomes, over_latency_budget(cfg, base_timings, timed))
                     if is_over)
    outcomes, lead = ranked(outcomes, metric, n, task.higher_is_better, cfg.search.constraint, over)
    run.record(*(os.path.join(run.final_path, f"rank{place}.pt") for place in range(1, len(outcomes) + 1)))
    os.makedirs(run.final_path, exist_ok=True)
    base_test = score(prep.model, iterate_batches(prep.data.test, range(len(prep.data.test)), 500), task=task)
    base_val = score(prep.model, iterate_batches(prep.data.train, splits.heldout, 500), task=task)
    finals = []
    for place, (cand, search_rank, metrics, _) in enumerate(outcomes, 1):
        model, timed_model = models[cand.index], final_timings[cand.index]
        record = pruned_record(prep.spec, prep.space, cand.ratios, cfg.search.criterion, cfg.search.granularity,
                               prep.base_checkpoint, prep.data.contract, cfg.model.task)
        entry = FinalModel(rank=place, candidate=cand.index, search_rank=search_rank, adaptive_bn_score=cand.score,
                           **finetuned(metric, metrics),
                           val_margin=_margin(metric, metrics.get(f"best_val_{metric}"), n),
                           tied_with_best=place <= lead, fine_tuned=bool(metrics.get("best_epoch")),
                           over_latency_budget=cand.index in over,
                           flops=record.flops, flops_ratio=record.flops / prep.space.base_flops, params=record.params,
                           path=os.path.join(run.final_path, f"rank{place}.pt"), **dataclasses.asdict(timed_model))
        save_pruned(entry.path, model, record, entry)
        entry.size_mb = os.path.getsize(entry.path) / 2 ** 20
        finals.append(entry)
    summary = Summary(
        base=BaseFigures(flops=prep.space.base_flops, params=prep.space.base_params, test=base_test[metric],
                         val=base_val[metric], score=search_score(task, base_val, cfg.evaluation.metric),
                         checkpoint=prep.base_checkpoint, size_mb=state_dict_mb(prep.model),
                         **dataclasses.asdict(base_timings)),
        input=prep.data.contract.to_dict() if prep.data.contract else None,
        task=TaskInfo(name=task.name, metric=metric, metrics=list(task.metrics),
                      higher_is_better=task.higher_is_better),
        finetune=FinetuneInfo(epochs=cfg.finetune.epochs, scheduler=cfg.finetune.scheduler),
        splits=Splits(heldout=len(splits.heldout), validation=n, rest=len(splits.rest)),
        device="cuda" if next(prep.model.parameters()).is_cuda else "cpu",
        granularity=cfg.search.granularity,
        search=SearchInfo(candidates=len(records), ok=sum(r.ok for r in records),
                          failed=sum(not r.ok for r in records), constraint=cfg.search.constraint,
                          target=cfg.search.target, tolerance=cfg.search.tolerance, limits=dict(cfg.search.limits)),
        latency=LatencyInfo(threads=cfg.latency.threads, device=cfg.latency.device, runtime=cfg.latency.runtime,
                            batch_size=prep.space.latency.batch_size if prep.space.latency else None,
                            table=prep.space.latency.key if prep.space.latency else None,
                            table_worst_error=prep.space.latency.worst_error if prep.space.latency else None,
                            layers=layer_costs(prep, outcomes[0][0].ratios)),
        sparsity=prep.sparsity,
        final=finals)
    if front(cfg):
        summary.front = front_summary(prep.sampler, records, finals, summary.base)
    run.record(*report_files(run, summary))
    write_report(run, summary, records)
    return summary
