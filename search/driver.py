"""The run, start to end: lock the run directory, start or join Ray, run (or continue) both stages, finalize.

The flow: prepare.prepare() (checks, before Ray) -> cluster.connect() -> prepare.ensure_base() ->
stages.run_search() -> stages.run_finetune() -> finalize.finalize().
"""
from __future__ import annotations

import os
from typing import Any, Callable

from prunetune.workers.files import write_json

from .cluster import check_resources, connect, ray_output_to
from .finalize import finalize
from .front import finalists
from .prepare import LATENCY_TABLE, Checked, Prepared, ensure_base, warn
from .rundir import RunDir, no_space
from .runfiles import Summary
from .stages import run_finetune, run_search, unfinished_search
from .store import CandidateStore

RAY_LOG = "ray.log"  # Ray's own messages during the run (OUTPUT/ray.log): the terminal gets prunetune's lines only


def launch(checked: Checked, run: RunDir, address: str | None, restore: bool, overwrite: bool = False,
           body: Callable[[Prepared, RunDir, bool], Any] | None = None) -> Any:
    """Connect to Ray (or start it) and check that it can run the trials, get the trained base model, then take
    the run lock, run or continue both stages (or `body`, e.g. fine-tuning a candidate again), and let go of both.
    Nothing is written before the cluster has answered, and no base model is trained for trials that could never
    run. While the stages run, Ray's own messages go to OUTPUT/ray.log."""
    started = connect(checked.cfg, address)
    try:
        check_resources(checked.cfg)
        prep = ensure_base(checked)
        run.acquire()
        try:
            if not restore:
                run.create(prep.cfg, overwrite)
                if prep.space.latency is not None:
                    run.record(LATENCY_TABLE)
                    write_json(os.path.join(run.path, LATENCY_TABLE), prep.space.latency.to_dict())
            run.record(RAY_LOG)
            with ray_output_to(os.path.join(run.path, RAY_LOG)):
                return (body or execute)(prep, run, restore)
        finally:
            run.release()
    finally:
        if started:
            import ray

            ray.shutdown()


def execute(prep: Prepared, run: RunDir, restore: bool) -> Summary:
    """Run (or continue) both stages as the manifest says, then write the final models and report.

    When resuming, a stored result part the manifest lists but the disk no longer holds intact sends the run
    back to the search stage: its candidates are evaluated again and the finalists are chosen anew. A search that
    the time budget ended before every candidate was stored has its best so far fine-tuned, but the run stays in
    stage search (never done), so resume continues it.
    """
    store = CandidateStore(run.path)
    manifest = run.manifest()
    lost = store.verify(manifest.candidates) if restore else []
    if (manifest.stage or "search") == "search" or lost:
        run_search(prep, run)
        restore = False  # the fine-tuning stage starts afresh
    records = store.records()
    unfinished = unfinished_search(records, prep.cfg, run)  # the time budget ended it: it stays in stage search
    run.update(stage="search" if unfinished else "finetune", candidates=store.manifest())
    top = finalists(prep.sampler, records, prep.cfg.search.top_k)  # with a front: the top_k of each budget
    grid = run_finetune(prep, run, top, restore)
    full = next(filter(None, (no_space(result.error) for result in grid)), None)
    if full is not None:  # a finalist's checkpoint did not fit: stop resumably, not with the epochs it had
        raise full
    summary = finalize(prep, run, top, grid, records)
    run.update(stage="search" if unfinished else "done", candidates=store.manifest())
    if unfinished:
        warn(unfinished)
    return summary
