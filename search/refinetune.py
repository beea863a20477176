"""`prunetune finetune RUN --candidate N`: fine-tune one stored candidate again, with the run's recipe or another
(`--set finetune.*`), into the run's final/ beside what is there: final/candidate-N-<recipe hash>.pt, from the Tune
experiment tune/finetune-candidate-N-<recipe hash>. The run's final models, summary, report and its own Tune
experiments stay as they were."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from prunetune.workers.finetune import load_finetuned
from prunetune.workers.methods import METHODS
from prunetune.workers.record import CandidateRecord

from .artifacts import pruned_record, save_pruned
from .config import Config, ConfigError, resumable
from .finalize import NoFinalModel, finetuned, timings
from .prepare import Prepared
from .rundir import RunDir
from .runfiles import Refinetuned
from .stages import run_finetune
from .store import CandidateStore


def recipe_hash(cfg: Config) -> str:
    """Hash of the fine-tuning recipe: every finetune.* key that decides the result (not its timeout)."""
    recipe = {k: v for k, v in cfg.finetune.model_dump().items() if not resumable(f"finetune.{k}")}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:8]


def stored_candidate(run: RunDir, index: int) -> CandidateRecord:
    """The run's stored candidate `index`, if it was evaluated successfully (ConfigError otherwise)."""
    records = {r.index: r for r in CandidateStore(run.path).records()}
    if index not in records:
        raise ConfigError(f"--candidate: {run.path} stores no candidate {index} (it holds "
                          f"{len(records)}: 0 to {max(records, default=-1)})")
    if not records[index].ok:
        raise ConfigError(f"--candidate: candidate {index} failed in the search ({records[index].error})")
    return records[index]


def _stem(index: int, cfg: Config) -> str:
    return f"candidate-{index}-{recipe_hash(cfg)}"


def candidate_path(run: RunDir, index: int, cfg: Config) -> str:
    """Where candidate `index` fine-tuned with cfg's recipe goes (ConfigError if a file is there already)."""
    path = os.path.join(run.final_path, f"{_stem(index, cfg)}.pt")
    if os.path.exists(path):
        raise ConfigError(f"--candidate: {path} exists: candidate {index} was fine-tuned with this recipe already "
                          "(remove the file to fine-tune it again, or change a finetune.* setting)")
    return path


def refinetune(prep: Prepared, run: RunDir, record: CandidateRecord) -> Refinetuned:
    """Fine-tune `record` with prep's recipe as its own Tune experiment and save the kept model at its
    `candidate_path`; its figures (what the model file stores beside it, `path` among them)."""
    cfg, metric, stem = prep.cfg, prep.task.metric, _stem(record.index, prep.cfg)
    path = os.path.join(run.final_path, f"{stem}.pt")
    run.record(path)
    result = run_finetune(prep, run, [record], restore=False, name=f"finetune-{stem}")[0]
    if result.checkpoint is None:
        raise NoFinalModel(f"fine-tuning candidate {record.index} produced no model ({result.error})")
    with result.checkpoint.as_directory() as d:
        state = load_finetuned(d)
    model = METHODS[cfg.search.granularity].plan(prep.model, prep.space, cfg.search.criterion,
                                                 cfg.evaluation.seed).apply(record.ratios)
    model.load_state_dict(state)
    stored = pruned_record(prep.spec, prep.space, record.ratios, cfg.search.criterion, cfg.search.granularity,
                           prep.base_checkpoint, prep.data.contract, cfg.model.task)
    figures = Refinetuned(candidate=record.index, adaptive_bn_score=record.score, **finetuned(metric, result.metrics),
                          flops=stored.flops, flops_ratio=stored.flops / prep.space.base_flops, params=stored.params,
                          path=path, finetune=cfg.finetune.model_dump(),
                          **dataclasses.asdict(timings([(model, record.ratios)], prep)[0]))
    os.makedirs(run.final_path, exist_ok=True)
    save_pruned(path, model, stored, figures)
    return figures
