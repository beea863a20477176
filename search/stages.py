"""The two Tune stages of a run: the search (one trial per batch of candidates) and the fine-tuning of the best few."""
from __future__ import annotations

import os
import shutil

from prunetune.workers.constraints import CONSTRAINTS
from prunetune.workers.errors import RunFailed
from prunetune.workers.evaluator import evaluation_data
from prunetune.workers.logs import RUN
from prunetune.workers.methods import METHODS
from prunetune.workers.record import CandidateRecord, best

from .algorithms import ALGORITHMS
from .baselines import baselines, run_baselines
from .cluster import tune_settings
from .config import Config, grace_epochs, loader_workers
from .prepare import Prepared, data_kwargs
from .rankings import rankings
from .rundir import RunDir
from .store import CandidateStore
from .trials import TrialPayload, evaluate_candidates, finetune_candidate


class SearchFailed(RunFailed, RuntimeError):
    """The search stopped without a usable result (e.g. too many failed candidates)."""


def payload(prep: Prepared, run: RunDir, finalists: list[CandidateRecord] | None = None) -> TrialPayload:
    """What every trial of this run receives (the base weights go to the object store once)."""
    import ray

    cfg = prep.cfg
    state = {k: v.detach().cpu() for k, v in prep.model.state_dict().items()}
    heldout = evaluation_data(prep.data, cfg.evaluation.settings(), loader_workers(cfg))  # decoded here, once per run
    return TrialPayload(run_id=run.manifest().run_id or "run", model=prep.spec, base_state=[ray.put(state)],
                        space=prep.space, evaluation_data=[ray.put(heldout)],
                        data=data_kwargs(cfg), evaluation=cfg.evaluation.settings(), finetune=cfg.finetune.settings(),
                        workers_per_finalist=cfg.finetune.workers_per_finalist,
                        criterion=cfg.search.criterion, method=METHODS[cfg.search.granularity],
                        cpus_per_trial=cfg.resources.cpus_per_trial, gpus_per_trial=cfg.resources.gpus_per_trial,
                        finalists=finalists or [], num_workers=loader_workers(cfg),
                        task=cfg.model.task)


def latency_budget_ms(prep: Prepared, ratios) -> float | None:
    """The latency bound of a candidate's strategy in milliseconds (a limit, or the top of its own budget's band),
    when a budget names latency."""
    bound = prep.sampler.bound("latency", ratios)
    return bound * CONSTRAINTS["latency"].base(prep.space) if bound is not None else None


def _trainable(fn, trial_payload: TrialPayload, cfg: Config, data_parallel: bool = False):
    """`fn` with the run's payload and a trial's resources. A trial that only drives Ray Train workers (which request
    their own) holds no CPU or GPU: Tune refuses an empty request, so it asks for one byte of memory."""
    from ray import tune

    r = cfg.resources
    return tune.with_resources(tune.with_parameters(fn, payload=trial_payload),
                               {"cpu": 0, "memory": 1} if data_parallel else {"cpu": r.cpus_per_trial,
                                                                            "gpu": r.gpus_per_trial})


def _finalists_at_once(cfg: Config) -> int:
    """search.max_concurrent_trials, or fewer when data-parallel finalists' Train workers would not all fit the
    cluster now: a finalist's trial waiting for its workers would run down finetune.epoch_timeout_s."""
    import ray

    f, r = cfg.finetune, cfg.resources
    if f.workers_per_finalist == 1:
        return cfg.search.max_concurrent_trials
    total = ray.cluster_resources()
    fits = [total.get("CPU", 0) // (f.workers_per_finalist * r.cpus_per_trial)]
    if r.gpus_per_trial > 0:
        fits.append(total.get("GPU", 0) // (f.workers_per_finalist * r.gpus_per_trial))
    return max(1, min(cfg.search.max_concurrent_trials, int(min(fits))))


def _candidate_dirname(trial) -> str:
    candidates = trial.config.get("candidates")
    return f"cand-{candidates[0].index if candidates else 0:06d}-{trial.trial_id}"


def _finalist_dirname(trial) -> str:
    return f"finalist{trial.config.get('rank', 0)}-{trial.trial_id}"


def failure_verdict(records: list[CandidateRecord], cfg: Config) -> str | None:
    """A message if no candidate succeeded or the failed fraction exceeds search.max_failed_fraction."""
    if not records:
        budget = f" within search.time_budget_s={cfg.search.time_budget_s:g}" if cfg.search.time_budget_s else ""
        return f"search stopped: no candidate was evaluated{budget}; `prunetune resume` continues it"
    failed = [r for r in records if not r.ok]
    if len(failed) / len(records) > cfg.search.max_failed_fraction or len(failed) == len(records):
        return (f"search stopped: {len(failed)} of {len(records)} candidates failed (search.max_failed_fraction="
                f"{cfg.search.max_failed_fraction}); last error: {failed[-1].error}")
    over = [r for r in records if r.ok and r.within_budget is False]
    if over and not best(records, 1):
        return (f"search stopped: none of the {len(records)} candidates can be fine-tuned: {len(over)} were timed "
                f"over their latency budget ({over[-1].warning}); time on a quieter machine or widen "
                "search.tolerance")
    return None


def run_search(prep: Prepared, run: RunDir) -> list[CandidateRecord]:
    """Stage 1: evaluate the candidates the store does not hold yet, in batches (a Tune trial each); return all stored
    records.

    The store is the search's state, so a resumed search is a new Tune experiment over the missing candidates
    (a changed time budget or concurrency applies, and lost or damaged result parts are evaluated again).
    """
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .ledger import Ledger, LedgerStopper, leaderboard_path
    from .tensorboard import have_tensorboardx
    from .tune_search import StrategySearcher

    cfg = prep.cfg
    s = cfg.search
    tune_settings()
    run.record(os.path.join(run.tune_path, "search"), leaderboard_path(run.path))  # what this stage writes
    shutil.rmtree(os.path.join(run.tune_path, "search"), ignore_errors=True)
    names = run_baselines(run.manifest().baselines, bool(CandidateStore(run.path).records()))
    run.update(baselines=list(names))  # a resumed run proposes the same ones, whatever this prunetune's set
    searcher = StrategySearcher(ALGORITHMS[s.algorithm](prep.sampler, s.population), s.algorithm,
                                baselines(prep.sampler, rankings(prep, names)), s.num_candidates,
                                CandidateStore(run.path), s.batch_size, s.max_concurrent_trials,
                                retry_lost=s.max_failures > 0, latency_budget=lambda r: latency_budget_ms(prep, r))
    ledger = Ledger(run.path, s.num_candidates, searcher, top_k=s.top_k, max_failed_fraction=s.max_failed_fraction,
                    minimum=min(s.num_candidates, max(4, s.num_candidates // 10)), timeout_s=s.candidate_timeout_s,
                    curves=have_tensorboardx())
    tuner = tune.Tuner(
        _trainable(evaluate_candidates, payload(prep, run), cfg),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, s.max_concurrent_trials), num_samples=-1, reuse_actors=True,
            trial_dirname_creator=_candidate_dirname, time_budget_s=s.time_budget_s),
        run_config=tune.RunConfig(
            name="search", storage_path=run.tune_path, verbose=0,
            failure_config=tune.FailureConfig(max_failures=s.max_failures), callbacks=[ledger],
            stop=LedgerStopper(ledger)))
    try:
        tuner.fit()
    finally:
        ledger.flush()  # a Ctrl-C leaves Tune's loop without its on_experiment_end: commit what was received
    store = CandidateStore(run.path)
    store.compact()
    records = store.records()
    verdict = failure_verdict(records, cfg)
    if verdict:
        raise SearchFailed(verdict)
    unfinished = unfinished_search(records, cfg, run)
    if unfinished:
        RUN.info(f"[search] {unfinished}; the best so far are fine-tuned")
    return records


def unfinished_search(records: list[CandidateRecord], cfg: Config, run: RunDir) -> str | None:
    """None when every candidate 0..num_candidates-1 is stored (ok or failed): only then is the search complete.
    Otherwise (the time budget ended it) what is missing and how to continue it."""
    n = cfg.search.num_candidates
    stored = len({r.index for r in records if r.index < n})  # no set of all n: n may be huge
    if stored == n:
        return None
    why = f"on its time budget (search.time_budget_s={cfg.search.time_budget_s:g})" if cfg.search.time_budget_s \
        else "early"
    return (f"search stopped {why} with {stored}/{n} candidates; the run is not complete: `prunetune resume "
            f"{run.path}` evaluates the other {n - stored}")


def run_finetune(prep: Prepared, run: RunDir, top: list[CandidateRecord], restore: bool, name: str = "finetune"):
    """Stage 2: fine-tune the finalists in parallel (ASHA or FIFO) as the Tune experiment tune/`name`; return Tune's
    ResultGrid.

    When resuming, Tune's experiment is restored: every finalist continues from its last epoch checkpoint.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .tensorboard import finetune_callbacks
    from .tune_search import EpochTimeouts, FinetuneProgress

    cfg = prep.cfg
    f = cfg.finetune
    tune_settings()
    trainable = _trainable(finetune_candidate, payload(prep, run, top), cfg, data_parallel=f.workers_per_finalist > 1)
    finalists = {"rank": tune.grid_search(list(range(1, len(top) + 1)))}
    path = os.path.join(run.tune_path, name)
    run.record(path)
    # Tuner.restore runs the callbacks pickled when the stage first started and takes no run config: EpochTimeouts
    # reads the limit in force from here at each start (finetune.epoch_timeout_s may change on resume)
    run.update(epoch_timeout_s=f.epoch_timeout_s)
    if restore and tune.Tuner.can_restore(path):
        RUN.info(f"[finetune] restoring the Tune experiment in {path}")
        # param_space again: a state file torn by a SIGKILL makes Tune restart the experiment from it
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=finalists)
    else:
        shutil.rmtree(path, ignore_errors=True)
        scheduler = (ASHAScheduler(time_attr="epoch", metric=f"best_val_{prep.task.metric}",
                                   mode="max" if prep.task.higher_is_better else "min", max_t=f.epochs,
                                   grace_period=grace_epochs(cfg), reduction_factor=3)
                     if f.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space=finalists,
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=_finalists_at_once(cfg),
                                        reuse_actors=True, trial_dirname_creator=_finalist_dirname),
            run_config=tune.RunConfig(name=name, storage_path=run.tune_path, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      callbacks=[FinetuneProgress(prep.task.metric), EpochTimeouts(run.path),
                                                 *finetune_callbacks()]))
    ddp = f", {f.workers_per_finalist} DDP workers each" if f.workers_per_finalist > 1 else ""
    RUN.info(f"[finetune] fine-tuning the top {len(top)} for up to {f.epochs} epochs ({f.scheduler}{ddp})")
    return tuner.fit()
