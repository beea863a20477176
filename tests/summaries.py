"""Run summaries built by hand for the report's tests: every field finalize writes, the figures a test names set."""
from __future__ import annotations

from prunetune.search.runfiles import (BaseFigures, FinalModel, FinetuneInfo, LatencyInfo, SearchInfo, Splits,
                                       Summary, TaskInfo)


def timings(ms: float, iqr: float) -> dict:
    """The timing fields of a model timed at `ms` (median) with interquartile range `iqr`."""
    return {"latency_ms_batch1": ms, "latency_iqr_ms": iqr, "throughput_batch": 32, "latency_ms_throughput": 10 * ms,
            "images_per_s": 3200 / ms}


def final_model(**fields) -> FinalModel:
    """A final model: rank 1, candidate 5, fine-tuned 2 epochs at half the FLOPs, unless `fields` say otherwise."""
    return FinalModel(**{"metric": "accuracy", "rank": 1, "candidate": 5, "search_rank": 1, "adaptive_bn_score": 0.55,
                         "val_before_finetune": 0.9, "val": 0.97, "test": 0.98, "val_margin": None,
                         "tied_with_best": True, "epochs": 2, "kept_epoch": 2, "fine_tuned": True, "flops": 500_000,
                         "flops_ratio": 0.5, "params": 5_000, "path": "final/rank1.pt", "size_mb": 0.02,
                         **timings(0.1, 0.01), **fields})


def summary(final: list[FinalModel], base_ms: float = 0.2, base_iqr: float = 0.01, **fields) -> Summary:
    """A classification run's summary with these final models, its base timed at `base_ms`."""
    base = BaseFigures(flops=1_000_000, params=10_000, test=0.99, val=1.0, score=1.0, checkpoint="base.pt",
                       size_mb=0.04, **timings(base_ms, base_iqr))
    return Summary(**{"base": base, "input": None, "device": "cpu", "granularity": "channel", "sparsity": None,
                      "task": TaskInfo(name="classification", metric="accuracy", metrics=["accuracy", "loss"],
                                       higher_is_better=True),
                      "finetune": FinetuneInfo(epochs=2, scheduler="fifo"),
                      "splits": Splits(heldout=300, validation=288, rest=850),
                      "search": SearchInfo(candidates=8, ok=8, failed=0, constraint="flops", target=0.5,
                                           tolerance=0.02, limits={}),
                      "latency": LatencyInfo(threads=1, device="cpu", runtime="torch", table=None,
                                             table_worst_error=None, layers=None),
                      "final": final, **fields})
