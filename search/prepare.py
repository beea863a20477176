"""Everything the driver checks before Ray starts, and the base model it trains after.

Cheap checks come before expensive ones: writable output and cache, model name, data, held-out split, then
the preflight on the untrained architecture (seconds). Only after Ray has started and can run the trials is
the base model trained (or loaded from the cache): `ensure_base`.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn

from prunetune.workers.constraints import CONSTRAINTS
from prunetune.workers.criteria import BATCHNORM, CRITERIA
from prunetune.workers.data import DataBundle, iterate_batches, load_data
from prunetune.workers.files import atomic_write, unwritable, write_text
from prunetune.workers.finetune import FinetuneOptions, finetune
from prunetune.workers.groups import SpaceError
from prunetune.workers.methods import METHODS
from prunetune.workers import logs
from prunetune.workers.latency import describe_costs, load_or_build, where_time_went
from prunetune.workers.logs import LineStream
from prunetune.workers.models import ModelError, build_model, check_model_name, load_checkpoint, nonfinite, \
    read_state_dict
from prunetune.workers.preflight import PreflightOptions, Verdict
from prunetune.workers.scoring import score
from prunetune.workers.sparsity import batchnorms, histogram
from prunetune.workers.space import PruningSpace
from prunetune.workers.splits import splits_of
from prunetune.workers.tasks import Task, TaskError, resolve_task

from .config import Config, ConfigError, budgets, check_runtime, loader_workers, needs_latency, training_recipe
from .sampler import StrategySampler
from .store import sha256

LATENCY_TABLE = "latency-table.json"  # the run's copy of its latency table, in the run directory

# The training_recipe keys that shape a base model trained here (epochs come from model.pretrain_epochs).
BASE_RECIPE_KEYS = ("batch_size", "lr", "momentum", "nesterov", "weight_decay", "warmup_epochs", "label_smoothing",
                    "amp", "seed")


@dataclass(frozen=True)
class Checked:
    """What `prepare` builds and proves before Ray starts: data, base architecture, proven space, sampler."""

    cfg: Config
    data: DataBundle
    model: nn.Module  # the base architecture, with model.checkpoint's weights when one is configured
    checkpoint: str | None  # model.checkpoint (absolute), or None: the base model is trained or cached
    space: PruningSpace
    sampler: StrategySampler
    spec: dict
    verdict: Verdict
    task: Task  # model.task, resolved


@dataclass(frozen=True)
class Prepared(Checked):
    """A checked search with its trained base model (`ensure_base`): what both stages and the final models use."""

    base_checkpoint: str  # the weights the search prunes: model.checkpoint, the cached base, or its sparse copy
    sparsity: dict | None = None  # the method's sparsity training: lambda, epochs, values before and after


def warn(message: str, log=None) -> None:
    """A warning for the user: one line through the prunetune logger (on stderr), or on `log` when given."""
    if log is None:
        logs.warn(message)
    else:
        print(f"prunetune: warning: {message}", file=log, flush=True)


def data_kwargs(cfg: Config) -> dict:
    """load_data arguments for this config, with absolute paths (trials may run elsewhere)."""
    d = cfg.data
    return {"name": d.name, "path": os.path.abspath(d.path) if d.path else None,
            "image_size": d.image_size, "num_classes": d.num_classes, "train_size": d.train_size,
            "test_size": d.test_size, "seed": d.seed, "cache_dir": cfg.output.cache_dir,
            "kwargs": dict(d.kwargs), "max_image_pixels": d.max_image_pixels}


def model_spec(cfg: Config, num_classes: int, in_channels: int) -> dict:
    """What build_model needs to rebuild the base architecture."""
    return {"name": cfg.model.name, "num_classes": num_classes, "in_channels": in_channels,
            "kwargs": dict(cfg.model.kwargs)}


def make_sampler(cfg: Config, space: PruningSpace) -> StrategySampler:
    """The search's sampler in `space` (SpaceError if a budget cannot be met)."""
    s = cfg.search
    return StrategySampler(space, s.target, s.tolerance, s.max_ratio, s.seed, CONSTRAINTS[s.constraint],
                           budgets(cfg), s.front_points)


def attach_latency(cfg: Config, model: nn.Module, space: PruningSpace, log=None) -> None:
    """Give `space` the latency table of `model` on the configured device (cached, or timed now)."""
    if space.latency is not None:
        return
    lat = cfg.latency
    if lat.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("latency.device: cuda, but this machine has no CUDA device (the latency table is timed "
                          "where the driver runs); use cpu or run the driver on a GPU node")
    example = space.example_input(lat.batch_size).to(lat.device)
    start = time.perf_counter()
    saved = os.path.join(cfg.output.dir, LATENCY_TABLE)  # a run keeps its table: resume predicts alike
    space.latency, path, built = load_or_build(model, space, example, cfg.output.cache_dir, lat.threads,
                                               lat.grid, lat.repeats, saved=saved, max_fit_error=lat.max_fit_error,
                                               runtime=lat.runtime)
    how = f"timed in {time.perf_counter() - start:.1f} s, cached at" if built else "loaded from"
    print(f"latency table ({lat.runtime} on {space.latency.device}, batch {lat.batch_size}, threads {lat.threads}): "
          f"{how} {path}; "
          f"base {space.latency.base_ms:.2f} ms, worst fit error {100 * space.latency.worst_error:.1f}%",
          file=log or LineStream(), flush=True)


def where_time_goes(cfg: Config, space: PruningSpace) -> str:
    """`inspect --latency`'s per-layer table: the latency of each layer before and after pruning at the configured
    target (the uniform strategy, or the search's first draw where no single ratio lands in the band), as the
    space's latency table predicts it, and the layers whose channel counts cost speed."""
    from .baselines import uniform

    sampler, table = make_sampler(cfg, space), space.latency
    ratios = uniform(sampler)
    which = f"the uniform strategy (ratio {ratios[0]:.3f} in every group)" if ratios else "the search's first draw"
    kept = space.kept_batch(np.asarray(ratios or sampler.sample(0), dtype=np.float64)[None])
    full = space.kept_batch(np.zeros((1, len(space.groups))))
    s = cfg.search
    return (f"where the time goes at search.target={s.target:g} ({s.constraint}): {which}, "
            f"{100 * CONSTRAINTS['flops'].fraction(space, kept)[0]:.1f}% of the FLOPs, "
            f"{100 * table.predict(space, kept)[0] / table.predict(space, full)[0]:.1f}% of the base's predicted "
            f"latency\n{describe_costs(where_time_went(table, space, kept[0]), table.multiple)}")


def task_of(cfg: Config) -> Task:
    """model.task's Task (ConfigError naming the field if it names none)."""
    try:
        return resolve_task(cfg.model.task)
    except TaskError as e:
        raise ConfigError(str(e).replace("task:", "model.task:", 1)) from None


def prove_space(cfg: Config, model: nn.Module, example_inputs: torch.Tensor, num_classes: int,
                log=None) -> Verdict:
    """The preflight of the configured method on `model` (its architecture), for the configured search;
    the latency table is attached first when a budget names latency."""
    s = cfg.search

    def first_strategy(space: PruningSpace) -> list[float]:
        if needs_latency(cfg):
            attach_latency(cfg, model, space, log)
        try:
            return make_sampler(cfg, space).sample(0)
        except SpaceError as e:
            e.space = space  # `inspect --latency` shows the table that refused the target before the refusal
            raise

    verdict = METHODS[s.granularity].preflight(model, example_inputs, PreflightOptions(
        num_classes, s.max_ratio, first_strategy, s.round_to, cfg.model.ignored_layers, task_of(cfg)))
    if needs_latency(cfg):
        attach_latency(cfg, model, verdict.space, log)
    return verdict


def prepare(cfg: Config, log=None) -> Checked:
    """Validate every input against the real model and data, in seconds and before Ray starts; the base model's
    trained weights come later (ensure_base), unless a checkpoint was given."""
    log = log or LineStream()
    for field, path in (("output.dir", cfg.output.dir), ("output.cache_dir", cfg.output.cache_dir)):
        reason = unwritable(path)
        if reason:
            raise ConfigError(f"{field}: cannot write to {path} ({reason})")
    check_runtime(cfg)  # the final models are timed in it, whatever the budget: refused now, not after the search
    check_model_name(cfg.model.name)
    task = task_of(cfg)
    untrainable = task.cannot_train()  # a run trains: fine-tuning always, the base model without a checkpoint
    if untrainable:
        raise ConfigError(f"model.task: {untrainable}")
    data = load_data(**data_kwargs(cfg), num_workers=loader_workers(cfg))
    for note in data.notes:
        warn(note, log)
    splits_of(len(data.train), cfg.evaluation.settings())
    spec = model_spec(cfg, data.num_classes, data.input_shape[0])
    torch.manual_seed(cfg.finetune.seed)  # the initial weights of a base model trained here: same seed, same model
    model = build_model(**spec)
    if cfg.model.checkpoint:
        done = load_checkpoint(model, cfg.model.checkpoint, cfg.model.checkpoint_key)  # refused before anything else
        if done:
            print(f"model.checkpoint: {done}", file=log, flush=True)
    if not batchnorms(model):
        sparsity = METHODS[cfg.search.granularity].sparsity
        for key, wanted in (("model.sparsity", cfg.model.sparsity and sparsity.needs_batchnorm),
                            ("search.criterion", CRITERIA[cfg.search.criterion].source == BATCHNORM)):
            if wanted:
                raise ConfigError(f"{key}: {cfg.model.name} has no BatchNorm layer with a scale (gamma); Network "
                                  "Slimming and bn_scale need one (use search.criterion: l1)")
    verdict = prove_space(cfg, model, data.example_input(), data.num_classes, log)
    for name, reason in verdict.left_out:
        warn(f"the group of {name} is not pruned ({reason})", log)
    checkpoint = os.path.abspath(cfg.model.checkpoint) if cfg.model.checkpoint else None
    return Checked(cfg, data, model.eval(), checkpoint, verdict.space, make_sampler(cfg, verdict.space), spec,
                   verdict, task)


def ensure_base(checked: Checked, log=None) -> Prepared:
    """The checked search with its trained base model: the configured checkpoint (already loaded), a cached base
    model for this recipe, or one trained now (the expensive step, after every check); then the method's
    sparsity training if model.sparsity asks for it."""
    base = checked.checkpoint or trained_base(checked.cfg, checked.model, checked.data, log, checked.task)
    checked.model.eval()
    sparsity = None
    if checked.cfg.model.sparsity:
        base, sparsity = sparsity_trained(checked, base, log)
    return Prepared(**{f.name: getattr(checked, f.name) for f in fields(Checked)}, base_checkpoint=base,
                    sparsity=sparsity)


def sparsity_trained(prep: Checked, base_checkpoint: str, log=None) -> tuple[str, dict]:
    """The method's sparsity training before the search (e.g. Network Slimming's L1 on every BatchNorm scale).
    Trains `prep.model` (weights of `base_checkpoint`) in place on the training split without the held-out and
    validation images, as the base trains; cached by the base it starts from, its recipe and those splits,
    resumable. Returns the sparse model's cache path and what was done (the penalised values before and after)."""
    log, cfg = log or LineStream(), prep.cfg
    training = METHODS[cfg.search.granularity].sparsity
    recipe = {"base": sha256(base_checkpoint), "lambda": cfg.model.sparsity, "epochs": cfg.model.sparsity_epochs,
              "method": training.name,
              "training": {k: getattr(training_recipe(cfg), k) for k in BASE_RECIPE_KEYS},
              "without_heldout": [cfg.evaluation.heldout_size, cfg.evaluation.seed],
              "without_validation": cfg.evaluation.validation_size}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = os.path.join(cfg.output.cache_dir, f"sparse-{cfg.model.name.replace(':', '_')}-{key}.pt")
    before = histogram(training.measure(prep.model))
    start_accuracy = score(prep.model, iterate_batches(prep.data.test, range(len(prep.data.test)), 500))["accuracy"]
    if _cached(path, prep.model, "sparsity training", log):
        print(f"sparsity training: loaded {path} (cached: same base, lambda and epochs)", file=log)
    else:
        print(f"sparsity training ({training.name}): {cfg.model.sparsity_epochs} epochs with an L1 penalty "
              f"{cfg.model.sparsity:g} (cached at {path}; resumable)", file=log)
        resume, device = path + ".resume", "cuda" if torch.cuda.is_available() else "cpu"
        rest = splits_of(len(prep.data.train), cfg.evaluation.settings()).rest  # the evaluation splits stay unseen
        training.train(prep.model, prep.data, replace(training_recipe(cfg), epochs=cfg.model.sparsity_epochs),
                       cfg.model.sparsity, FinetuneOptions(device, train_indices=rest, checkpoint_path=resume, log=log))
        _cache(path, prep.model, "sparsity training")
        os.remove(resume)
        prep.model.cpu()
    prep.model.eval()
    return path, {"method": training.name, "values": training.values, "lambda": cfg.model.sparsity,
                  "epochs": cfg.model.sparsity_epochs, "checkpoint": path, "base_checkpoint": base_checkpoint,
                  "test_accuracy_before": start_accuracy, "gamma_before": before,
                  "gamma_after": histogram(training.measure(prep.model), top=before["edges"][-1])}


def base_cache_path(cfg: Config, spec: dict, data_fingerprint: str | None = None) -> str:
    """Where a base model trained for this recipe is cached (keyed by what shapes it, nothing else: the data's
    content too, where the data set knows its fingerprint, and the held-out and validation splits it is trained
    without)."""
    data = {k: v for k, v in data_kwargs(cfg).items() if k not in ("cache_dir", "max_image_pixels")}
    recipe = {"model": spec, "data": {**data, "content": data_fingerprint} if data_fingerprint else data,
              "epochs": cfg.model.pretrain_epochs,
              "training": {k: getattr(training_recipe(cfg), k) for k in BASE_RECIPE_KEYS},
              "without_heldout": [cfg.evaluation.heldout_size, cfg.evaluation.seed],
              "without_validation": cfg.evaluation.validation_size}
    if cfg.model.task != "classification":  # what it was trained for (classification's keys stay as they were)
        recipe["task"] = cfg.model.task
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(cfg.output.cache_dir, f"base-{cfg.model.name.replace(':', '_')}-{key}.pt")


def trained_base(cfg: Config, model: nn.Module, data: DataBundle, log=None, task: Task | None = None) -> str:
    """Load a cached base model for this recipe into `model`, or train one and cache it; its path. The base trains
    on the training split without the held-out and validation images, so that they stay unseen: the search's scores
    and the fine-tuning's validation (epoch 0, the pruned base, included) are measured on data no weight saw."""
    log, task = log or LineStream(), task or task_of(cfg)
    path = base_cache_path(cfg, model_spec(cfg, data.num_classes, data.input_shape[0]), data.fingerprint)
    if _cached(path, model, "base model", log):
        print(f"base model: loaded {path} (cached: same model, data and training recipe)", file=log)
        return path
    print(f"base model: no model.checkpoint given and none cached for this recipe; training {cfg.model.name} for "
          f"{cfg.model.pretrain_epochs} epochs (cached at {path})", file=log)
    rest = splits_of(len(data.train), cfg.evaluation.settings()).rest
    result = finetune(model, data, replace(training_recipe(cfg), epochs=cfg.model.pretrain_epochs), FinetuneOptions(
        "cuda" if torch.cuda.is_available() else "cpu", train_indices=rest, stage="base training", task=task,
        num_workers=loader_workers(cfg), log=log))
    print(f"base model: test {task.metric} {result[f'test_{task.metric}']:.4f}", file=log)
    _cache(path, model, "base model")
    model.cpu()
    return path


def _cache(path: str, model: nn.Module, what: str) -> None:
    """Cache `model`'s weights at `path`, their SHA-256 beside them (path.sha256, as sha256sum writes it); a model
    with NaN or inf weights is refused (ModelError), never cached."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = nonfinite(state)
    if bad:
        raise ModelError(f"{what}: training ended with non-finite weights (NaN or inf in {len(bad)} of its tensors, "
                         f"e.g. {bad[0]}); nothing was cached; lower model.pretrain_lr, or give model.checkpoint")
    atomic_write(path, lambda tmp: torch.save(state, tmp), durable=True)
    write_text(path + ".sha256", f"{sha256(path)}  {os.path.basename(path)}\n", durable=True)


def _cached(path: str, model: nn.Module, what: str, log) -> bool:
    """Load the cache entry at `path` into `model` if there is one and it is sound: the SHA-256 stored with it,
    finite weights that fit the model. A damaged entry is reported in one line (and then rebuilt by the caller)."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path + ".sha256") as f:
            stored = f.read().split()[0]
    except (OSError, IndexError):
        stored = None
    if stored is None:
        problem = "no checksum stored with it"
    elif stored != sha256(path):
        problem = "its SHA-256 is not the one stored with it"
    else:
        try:
            state = read_state_dict(path, "output.cache_dir")
            problem = "it holds NaN or inf weights" if nonfinite(state) else ""
            if not problem:
                model.load_state_dict(state)
        except (ModelError, RuntimeError) as e:
            problem = str(e).splitlines()[0]
    if problem:
        print(f"{what}: the cached {path} is damaged ({problem}); building it again", file=log, flush=True)
    return not problem
