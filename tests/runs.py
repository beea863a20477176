"""The small digits run the search tests share: its `--set` overrides and its command-line arguments."""
from __future__ import annotations


def small(run, cache, *extra: str, candidates: int = 8, top_k: int = 1, epochs: int = 1) -> list[str]:
    """Overrides of a small, fast digits run (random search and fifo fine-tuning, so candidates and finals are
    reproducible whatever order trials finish in; one trial at a time, so each stage's Tune experiment reuses one
    trial process for all its trials: a trial process costs 4-6 CPU s of imports (ray.tune, torch), and the suite
    is CPU-bound); extras come last."""
    return ["search.algorithm=random", "search.max_concurrent_trials=1", f"output.dir={run}",
            f"output.cache_dir={cache}", "model.pretrain_epochs=2", f"search.num_candidates={candidates}",
            f"search.top_k={top_k}", "evaluation.calibration_batches=3", "evaluation.batch_size=64",
            "evaluation.heldout_size=150", f"finetune.epochs={epochs}", "finetune.scheduler=fifo", *extra]


def as_args(overrides: list[str]) -> list[str]:
    """`--set` arguments for a list of overrides."""
    return [arg for o in overrides for arg in ("--set", o)]


def run_args(tmp_path, *extra: str, cache=None, **sizes) -> list[str]:
    """`prunetune run` arguments of the small run writing into tmp_path/run, its base model cached in `cache`
    (default tmp_path/cache; runs that share one with the same recipe train the base model once)."""
    return ["run", *as_args(small(tmp_path / "run", cache or tmp_path / "cache", *extra, **sizes))]


def reachable_latency(config: str | None, overrides: list[str]) -> list[str]:
    """`search.target` and `search.tolerance` overrides spanning the latency range reachable on this machine (it
    depends on the CPU and its load), read from a latency table timed as the run times its own: the same
    architecture, input, device, batch, threads, grid and repeats, cached where the run looks for it."""
    import numpy as np

    from prunetune.search.config import load_config
    from prunetune.search.prepare import attach_latency, data_kwargs
    from prunetune.workers.constraints import CONSTRAINTS
    from prunetune.workers.data import load_data
    from prunetune.workers.models import build_model
    from prunetune.workers.space import PruningSpace

    cfg = load_config(config, overrides)
    data = load_data(**data_kwargs(cfg))
    model = build_model(cfg.model.name, data.num_classes, data.input_shape[0], cfg.model.kwargs)
    space = PruningSpace.from_model(model, data.example_input())
    attach_latency(cfg, model, space)
    most_pruned = space.kept_batch(np.full((1, len(space.groups)), cfg.search.max_ratio))
    floor = float(CONSTRAINTS["latency"].fraction(space, most_pruned)[0])
    return [f"search.target={(1 + floor) / 2}", f"search.tolerance={(1 - floor) / 2 + 0.05}"]
