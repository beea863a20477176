"""The small digits run the search tests share: its `--set` overrides and its command-line arguments."""
from __future__ import annotations


def small(run, cache, *extra: str, candidates: int = 8, top_k: int = 1, epochs: int = 1) -> list[str]:
    """Overrides of a small, fast digits run (random search and fifo fine-tuning, so candidates and finals are
    reproducible whatever order trials finish in); extras come last."""
    return ["search.algorithm=random", f"output.dir={run}", f"output.cache_dir={cache}", "model.pretrain_epochs=2",
            f"search.num_candidates={candidates}", f"search.top_k={top_k}", "evaluation.calibration_batches=3",
            "evaluation.batch_size=64", "evaluation.heldout_size=150", f"finetune.epochs={epochs}",
            "finetune.scheduler=fifo", *extra]


def as_args(overrides: list[str]) -> list[str]:
    """`--set` arguments for a list of overrides."""
    return [arg for o in overrides for arg in ("--set", o)]


def run_args(tmp_path, *extra: str, **sizes) -> list[str]:
    """`prunetune run` arguments of the small run writing into tmp_path/run (cache in tmp_path/cache)."""
    return ["run", *as_args(small(tmp_path / "run", tmp_path / "cache", *extra, **sizes))]
