"""The end of a run: final models (best validation accuracy first), their summary, and the report."""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn as nn

from prunetune.workers.data import heldout_split, iterate_batches
from prunetune.workers.finetune import load_finetuned
from prunetune.workers.granularity import GRANULARITIES
from prunetune.workers.record import CandidateRecord
from prunetune.workers.scoring import score

from .artifacts import pruned_record, save_pruned
from .prepare import Prepared
from .report import write_report
from .rundir import RunDir


class NoFinalModel(RuntimeError):
    """Fine-tuning produced no model."""


def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 30) -> tuple[float, float]:
    """Median and interquartile range of the forward latency in milliseconds on the example batch (after warm-up)."""
    model.eval()
    device = next(model.parameters()).device
    example = example.to(device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(example)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                times.append(1000 * (time.perf_counter() - t))
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return float(median), float(q3 - q1)


def finalize(prep: Prepared, run: RunDir, top: list[CandidateRecord], grid, records: list[CandidateRecord]) -> dict:
    """Write final/rankN.pt (best validation accuracy first), final/summary.json and report.md; the summary."""
    cfg = prep.cfg
    outcomes = []
    for result in grid:
        rank = result.config.get("rank")
        if not rank or rank > len(top) or result.checkpoint is None:
            continue
        with result.checkpoint.as_directory() as d:
            outcomes.append((top[rank - 1], rank, result.metrics, load_finetuned(d)))
    if not outcomes:
        raise NoFinalModel("fine-tuning produced no model (every fine-tuning trial failed)")
    outcomes.sort(key=lambda o: (-o[2].get("val_accuracy", 0.0), -o[0].score))
    os.makedirs(run.final_path, exist_ok=True)
    pruner = GRANULARITIES[cfg.search.granularity].pruner(prep.model, prep.space, cfg.search.criterion,
                                                          cfg.evaluation.seed)
    example = prep.data.example_input()
    base_test = score(prep.model, iterate_batches(prep.data.test, range(len(prep.data.test)), 500))
    heldout, _ = heldout_split(len(prep.data.train), cfg.evaluation.heldout_size, cfg.evaluation.seed)
    base_val = score(prep.model, iterate_batches(prep.data.train, heldout, 500))
    finals = []
    for place, (cand, search_rank, metrics, state) in enumerate(outcomes, 1):
        model = pruner.apply(cand.ratios)
        model.load_state_dict(state)
        record = pruned_record(prep.spec, prep.space, cand.ratios, cfg.search.criterion, cfg.search.granularity,
                               prep.base_checkpoint, prep.data.contract)
        entry = {"rank": place, "candidate": cand.index, "search_rank": search_rank,
                 "adaptive_bn_score": cand.score, "val_accuracy": metrics.get("val_accuracy"),
                 "test_accuracy": metrics.get("test_accuracy"), "epochs": metrics.get("epoch"),
                 "flops": record["flops"], "flops_ratio": record["flops"] / prep.space.base_flops,
                 "params": record["params"], "path": os.path.join(run.final_path, f"rank{place}.pt")}
        entry["latency_ms_batch1"], entry["latency_iqr_ms"] = latency_ms(model, example)
        save_pruned(entry["path"], model, record, entry)
        finals.append(entry)
    base_latency, base_iqr = latency_ms(prep.model, example)
    summary = {"base": {"flops": prep.space.base_flops, "params": prep.space.base_params,
                        "test_accuracy": base_test["accuracy"], "val_accuracy": base_val["accuracy"],
                        "score": base_val["accuracy"] if cfg.evaluation.metric == "accuracy" else -base_val["loss"],
                        "checkpoint": prep.base_checkpoint, "latency_ms_batch1": base_latency,
                        "latency_iqr_ms": base_iqr},
               "input": prep.data.contract.to_dict() if prep.data.contract else None,
               "finetune": {"epochs": cfg.finetune.epochs, "scheduler": cfg.finetune.scheduler},
               "device": "cuda" if next(prep.model.parameters()).is_cuda else "cpu",
               "search": {"candidates": len(records), "ok": sum(r.ok for r in records),
                          "failed": sum(not r.ok for r in records), "constraint": cfg.search.constraint,
                          "target": cfg.search.target, "tolerance": cfg.search.tolerance},
               "final": finals}
    write_report(run, summary, records)
    return summary
