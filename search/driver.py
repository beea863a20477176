"""The run, start to end: lock the run directory, start or join Ray, run (or continue) both stages, finalize.

The flow: prepare.prepare() (before Ray) -> stages.run_search() -> stages.run_finetune() -> finalize.finalize().
"""
from __future__ import annotations

from prunetune.workers.record import best

from .cluster import check_resources, connect
from .finalize import finalize
from .prepare import Prepared
from .rundir import RunDir
from .stages import run_finetune, run_search
from .store import CandidateStore


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
    if run.manifest().get("stage", "search") == "search":
        run_search(prep, run, restore)
        run.update(stage="finetune", candidates=store.manifest())
        restore = False  # the fine-tuning stage has not started yet
    records = store.records()
    top = best(records, prep.cfg.search.top_k)
    summary = finalize(prep, run, top, run_finetune(prep, run, top, restore), records)
    run.update(stage="done", candidates=store.manifest())
    return summary
