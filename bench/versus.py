"""prunetune's searched model against what a user would pick instead, on the same base, at the same FLOPs budget, with
the same fine-tuning (issue 34).

    python bench/versus.py --data /tmp/cifar10 [--checkpoint bench/checkpoints/resnet20-cifar10.pt --model resnet20]
        [--targets 0.5,0.3] [--candidates 32] [--seeds 3] [--steps 391] [--test-images 10000]
        [--recipes reference,prunetune] [--out versus]

Rows: prunetune's search as a run makes its model (the real search stage: `search.algorithm` TPE with its baseline
candidates, on embedded Ray, `--candidates` strategies scored by adaptive BN on the held-out images; its `--finalists`
best scores, as `search.top_k`, each fine-tuned like every other row, and the one with the best accuracy on the
finalists' validation split kept; each seed's finalists are in the row); Torch-Pruning's
MetaPruner stepped to the FLOPs target (global with GroupMagnitudeImportance(p=1), its default per-group mean
normaliser, and the same in one step at the ratio that lands at the target; global GroupTaylorImportance; global
BNScaleImportance; global isomorphic magnitude; uniform (local) magnitude); prunetune's uniform strategy and one random
strategy of the search's sampler. Every pruned network gets the same adaptive BN (the search's calibration batches) and
is scored on the search's held-out images, then fine-tuned from there once per seed by the `reference` recipe, the same
for every row (SGD momentum 0.9, no nesterov, cosine lr 0.01, weight decay 5e-4, padded crop + flip, batch 128,
`--steps` steps of a seeded draw of the training images the search did not hold out); `prunetune` adds prunetune's own
default recipe (distillation from the base) on the same images. FLOPs and params are fvcore's on the pruned network. The
pruned networks of every budget come first; then the fine-tunings run seed by seed over all budgets and rows, so a
partial result (bench/results/OUT.partial.json, rewritten after each) holds every row of every budget about equally
often.
`--smoke`: every row in seconds on a random ResNet-20 and tiny synthetic data.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from torch.utils.data import Subset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (SMOKE_DATA, cifar_arguments, parse_args, results_path, save, smoke_dir,  # noqa: E402
                          table)
from prunetune import (CandidateEvaluator, FinetuneOptions, StrategySampler, build_model, finetune,  # noqa: E402
                       load_config, score)
from prunetune.search.baselines import uniform  # noqa: E402
from prunetune.search.driver import launch  # noqa: E402
from prunetune.search.prepare import prepare  # noqa: E402
from prunetune.search.rundir import RunDir  # noqa: E402
from prunetune.search.stages import run_search  # noqa: E402
from prunetune.workers.data import iterate_batches  # noqa: E402
from prunetune.workers.methods.units import fvcore_counts  # noqa: E402
from prunetune.workers.record import best, best_networks  # noqa: E402

# key -> (row name, Torch-Pruning importance, global pruning, isomorphic, iterative): an iterative pruner steps to
# the FLOPs target; a one-shot one prunes in one step, at the ratio (found by bisection) that lands at the target
TORCH_PRUNING = {
    "tp-magnitude": ("TP global, GroupMagnitudeImportance(p=1)", lambda: tp.importance.GroupMagnitudeImportance(p=1),
                     True, False, True),
    "tp-magnitude-one-shot": ("TP global one-shot, GroupMagnitudeImportance(p=1)",
                              lambda: tp.importance.GroupMagnitudeImportance(p=1), True, False, False),
    "tp-taylor": ("TP global, GroupTaylorImportance", lambda: tp.importance.GroupTaylorImportance(), True, False,
                  True),
    "tp-bn-scale": ("TP global, BNScaleImportance", lambda: tp.importance.BNScaleImportance(), True, False, True),
    "tp-isomorphic": ("TP global isomorphic, GroupMagnitudeImportance(p=1)",
                      lambda: tp.importance.GroupMagnitudeImportance(p=1), True, True, True),
    "tp-uniform": ("TP uniform (local), GroupMagnitudeImportance(p=1)",
                   lambda: tp.importance.GroupMagnitudeImportance(p=1), False, False, True)}
METHODS = ("search", *TORCH_PRUNING, "uniform", "random")  # --methods: the rows to measure
TP_MAX_RATIO = 0.9  # MetaPruner's pruning ratio after its last step (--tp-steps of them; it stops at the target)
ONE_SHOT_TRIES = 14  # bisections of a one-shot pruner's ratio in [0, TP_MAX_RATIO]
TAYLOR_IMAGES = 64  # training images (not held out) whose loss gradients Taylor reads before each step
BATCH = 128  # the reference recipe's batch; --steps counts its steps, and the prunetune recipe sees the same images
REFERENCE = {"lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "warmup_epochs": 0.0,
             "label_smoothing": 0.0, "distill_weight": 0.0, "batch_size": BATCH, "epochs": 1, "amp": "off",
             "channels_last": "off"}
RECIPES = {"reference": REFERENCE, "prunetune": {"epochs": 1}}  # finetune.* over prunetune's defaults


def search_config(args, target: float, workdir: str):
    """The search's config: the base, the data, the budget, the candidates, CPU trials."""
    data = [f"data.{k}={v}" for k, v in SMOKE_DATA.items()] + ["data.name=synthetic"] if args.smoke else \
        ["data.name=imagefolder", f"data.path={args.data}"]
    return load_config(None, [
        f"model.name={args.model}", f"model.checkpoint={args.checkpoint}", *data,
        "search.constraint=flops", f"search.target={target}", "search.tolerance=0.01", "search.max_ratio=0.7",
        f"search.num_candidates={args.candidates}", "search.algorithm=tpe", "search.top_k=1",
        f"evaluation.heldout_size={args.heldout}", f"evaluation.calibration_batches={args.calibration_batches}",
        "resources.cpus_per_trial=1", "resources.gpus_per_trial=0",
        f"output.dir={os.path.join(workdir, f'{args.model}-{target}')}", f"output.cache_dir={args.cache_dir}"])


def search_row(args) -> str:
    """The search's row name."""
    return f"prunetune search (TPE, {args.candidates} candidates, best of {args.finalists} finalists)"


def classifier(model: nn.Module) -> nn.Module:
    """The last Linear layer: what a Torch-Pruning user lists in ignored_layers."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def torch_pruning(base: nn.Module, example: torch.Tensor, key: str, target: float, taylor_batches,
                  steps: int) -> nn.Module:
    """A copy of `base` pruned by Torch-Pruning's MetaPruner (TORCH_PRUNING[key]) until its FLOPs (as Torch-Pruning
    counts them) are at most `target` of the base's: stepped (`steps` steps to TP_MAX_RATIO, stopping at the
    first under the target), or in one step at the largest ratio (of ONE_SHOT_TRIES bisections) that is not over."""
    _, importance, global_pruning, isomorphic, iterative = TORCH_PRUNING[key]
    base_macs, _ = tp.utils.count_ops_and_params(base, example)

    def pruned(ratio: float, stop: float) -> nn.Module:
        model = copy.deepcopy(base).eval()
        pruner = tp.pruner.MetaPruner(model, example, importance(), global_pruning=global_pruning,
                                      isomorphic=isomorphic, pruning_ratio=ratio,
                                      iterative_steps=steps if iterative else 1, ignored_layers=[classifier(model)])
        taylor = isinstance(pruner.importance, tp.importance.GroupTaylorImportance)
        for _ in range(pruner.iterative_steps):
            if taylor:
                model.zero_grad()
                for x, y in taylor_batches:
                    nn.functional.cross_entropy(model(x), y).backward()
            pruner.step()
            if tp.utils.count_ops_and_params(model, example)[0] <= stop * base_macs:
                break
        model.zero_grad(set_to_none=True)
        return model

    if iterative:
        return pruned(TP_MAX_RATIO, target)
    low, high = 0.0, TP_MAX_RATIO  # the FLOPs fall as the ratio rises: `high` stays at or under the target
    for _ in range(ONE_SHOT_TRIES):
        middle = (low + high) / 2
        over = tp.utils.count_ops_and_params(pruned(middle, 1.0), example)[0] > target * base_macs
        low, high = (middle, high) if over else (low, middle)
    return pruned(high, 1.0)


def uniform_strategy(sampler: StrategySampler) -> list[float]:
    """prunetune's uniform baseline; where no single ratio lands in the band (the channel counts jump over it), the
    one whose FLOPs are nearest under the target, as the Torch-Pruning rows stop at or under it."""
    found = uniform(sampler)
    if found is not None:
        return found
    grid = np.linspace(0.0, sampler.max_ratio, 1401)
    values = sampler.measure(np.repeat(grid[:, None], len(sampler.space.groups), axis=1))
    under = np.flatnonzero(values <= sampler.target)
    return [float(grid[under[np.argmax(values[under])]])] * len(sampler.space.groups)


def heldout_accuracy(evaluator: CandidateEvaluator, data, model: nn.Module) -> float:
    """Adaptive BN on the search's calibration batches (in place), then accuracy on its held-out images."""
    evaluator.recalibrate(model)
    return score(model.eval(), iterate_batches(data.train, evaluator.heldout_indices, 500))["accuracy"]


def test_subset(data, images: int):
    """The data with its test split cut to a seeded random draw of `images` images, the same for every row (all
    when it has no more; an image folder's test split is sorted by class, so its first images are not a sample)."""
    t = data.test
    if images >= len(t):
        return data
    keep = np.sort(np.random.default_rng(0).choice(len(t), images, replace=False)).tolist()
    return dataclasses.replace(data, test=Subset(t, keep))


def spread(values: list[float]) -> float | None:
    """Sample standard deviation (None below two values)."""
    return round(statistics.stdev(values), 4) if len(values) > 1 else None


def strategies(args, target: float, workdir: str) -> tuple[dict, dict, list[dict]]:
    """The pruned networks at `target` (name -> net, adaptive BN done), their figures, and the search's top
    candidates."""
    cfg = search_config(args, target, workdir)
    checked = prepare(cfg)
    data, base, example = checked.data, checked.model, checked.data.example_input()
    evaluator = CandidateEvaluator(base, checked.space, data, cfg.evaluation, "cpu")
    nets, figures = {}, {}

    def add(key: str, name: str, make, candidates: int | None) -> None:
        if key not in args.methods.split(","):
            return
        start = time.perf_counter()
        net, spent = make()
        seconds = time.perf_counter() - start
        flops, params = fvcore_counts(net, example)
        figures[name] = {"flops_pct": round(100 * flops / base_flops, 2), "params": params,
                         "heldout_after_adaptive_bn": round(heldout_accuracy(evaluator, data, net), 4),
                         "seconds_to_strategy": round(seconds, 1), "candidates": spent or candidates}
        nets[name] = net
        print(f"{name}: {figures[name]}", flush=True)

    base_flops, _ = fvcore_counts(base, example)
    records: list = []
    finalists: list = []  # the search's top --finalists networks by score, best first: (candidate, net)

    def searched():
        found = launch(checked, RunDir(cfg.output.dir), None, restore=False, overwrite=True,
                       body=lambda prep, run, restore: run_search(prep, run))
        records.extend(r for r in found if r.ok)
        finalists.extend((r.index, evaluator.prune(r.ratios)) for r in best_networks(records, args.finalists))
        return finalists[0][1], len(found)  # the row's figures: its best score's network (add recalibrates it)

    add("search", search_row(args), searched, None)
    for _, net in finalists[1:]:
        evaluator.recalibrate(net)  # adaptive BN, as every other network gets before its fine-tuning
    rng = np.random.default_rng(0)
    rest = evaluator.rest_indices
    taylor = list(iterate_batches(data.train, rng.choice(rest, min(TAYLOR_IMAGES, len(rest)), replace=False),
                                  TAYLOR_IMAGES))
    for key, (name, *_) in TORCH_PRUNING.items():
        add(key, name, lambda key=key: (torch_pruning(base, example, key, target, taylor, args.tp_steps), None), 1)
    add("uniform", "prunetune uniform", lambda: (evaluator.prune(uniform_strategy(checked.sampler)), None), 1)
    add("random", "random valid strategy", lambda: (evaluator.prune(checked.sampler.sample(0)), None), 1)
    top = [{"index": r.index, "source": r.source, "heldout": round(r.score, 4), "flops_ratio": round(r.flops_ratio, 4)}
           for r in best(records, 5)]
    return {"base": base, "evaluator": evaluator, "data": data, "nets": nets, "finalists": finalists}, figures, top


def finetuned(net: nn.Module, setup: dict, recipe: str, seed: int, args) -> tuple[float, float]:
    """Validation and test accuracy of a copy of `net` after `recipe` with `seed` on --steps batches of BATCH
    training images (validated on the search's finalists' validation split, which none of them trains on)."""
    cfg = load_config(None).finetune.model_copy(update={**RECIPES[recipe], "seed": seed})
    pool = setup["evaluator"].rest_indices
    images = np.random.default_rng(seed).choice(pool, min(len(pool), args.steps * BATCH), replace=False)
    teacher = setup["base"] if cfg.distill_weight > 0 else None
    out = finetune(copy.deepcopy(net), test_subset(setup["data"], args.test_images), cfg.settings(),
                   FinetuneOptions(teacher=teacher, train_indices=images,
                                   val_indices=setup["evaluator"].validation_indices, log=io.StringIO()))
    return round(out["val_accuracy"], 4), round(out["test_accuracy"], 4)


def searched_row(setup: dict, recipe: str, seed: int, args) -> tuple[float, list[dict]]:
    """The search's model as a run makes it: each finalist fine-tuned alike, the best by validation kept (the first,
    the best score, on a tie). Its test accuracy, and every finalist's figures."""
    runs = [dict(zip(("candidate", "val", "test"), (index, *finetuned(net, setup, recipe, seed, args))))
            for index, net in setup["finalists"]]
    return max(runs, key=lambda run: run["val"])["test"], runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cifar_arguments(parser)
    parser.add_argument("--targets", default="0.5,0.3", help="FLOPs budgets, fractions of the base's")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"rows among {','.join(METHODS)}")
    parser.add_argument("--candidates", type=int, default=32, help="strategies the search scores")
    parser.add_argument("--finalists", type=int, default=3, help="the search's best scores fine-tuned, the best by "
                        "validation kept (search.top_k; 1: the best score alone)")
    parser.add_argument("--heldout", type=int, default=2000, help="held-out images scoring the candidates")
    parser.add_argument("--calibration-batches", type=int, default=20)
    parser.add_argument("--tp-steps", type=int, default=200, help="Torch-Pruning's iterative steps to a ratio of "
                        f"{TP_MAX_RATIO} (it stops at the FLOPs target)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tunings of every row (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=391, help=f"fine-tuning steps of {BATCH} images (391: an epoch)")
    parser.add_argument("--test-images", type=int, default=10000, help="test images (a seeded draw)")
    parser.add_argument("--recipes", default="reference", help=f"fine-tuning recipes among {','.join(RECIPES)}")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/prunetune"))
    parser.add_argument("--workdir", default="/tmp/prunetune-versus", help="the searches' run directories")
    parser.add_argument("--out", default="versus", help="results name: bench/results/OUT.json")
    args = parse_args(parser, {"model": "resnet20", "threads": 1, "targets": "0.5", "candidates": 6, "heldout": 64,
                               "calibration_batches": 2, "finalists": 2, "tp_steps": 5, "seeds": 1, "steps": 2,
                               "test_images": 32, "recipes": ",".join(RECIPES)}, require=("data",))
    torch.set_num_threads(args.threads)
    if args.smoke:  # a random ResNet-20 as the base; every file in the smoke directory
        args.workdir = args.cache_dir = os.path.join(smoke_dir(), "work")
        os.makedirs(args.workdir, exist_ok=True)
        args.checkpoint = os.path.join(args.workdir, "base.pt")
        torch.manual_seed(0)
        model = build_model(args.model, SMOKE_DATA["num_classes"], 3)
        for m in model.modules():  # BatchNorm scales of a trained net, not all 1 (BNScaleImportance ranks by them)
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.1, 1.0)
        torch.save(model.state_dict(), args.checkpoint)
    recipes = args.recipes.split(",")
    for option, given, allowed in (("recipes", recipes, RECIPES), ("methods", args.methods.split(","), METHODS)):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            parser.error(f"--{option}: unknown {', '.join(unknown)} (allowed: {', '.join(allowed)})")
    result: dict = {"args": vars(args), "recipes": {r: RECIPES[r] for r in recipes}, "budgets": []}
    setups = []
    for target in [float(t) for t in args.targets.split(",")]:
        setup, figures, top = strategies(args, target, args.workdir)
        setups.append(setup)
        result["budgets"].append({"model": args.model, "target": target, "search_top": top,
                                  "rows": [{"method": name, "recipe": recipe, **figures[name], "test": []}
                                           for recipe in recipes for name in setup["nets"]]})
        save(f"{args.out}.partial", result)
    for seed in range(args.seeds):
        for setup, budget in zip(setups, result["budgets"]):
            for row in budget["rows"]:
                start = time.perf_counter()
                if row["method"] == search_row(args):
                    test, runs = searched_row(setup, row["recipe"], seed, args)
                    row.setdefault("finalists", []).append(runs)
                else:
                    test = finetuned(setup["nets"][row["method"]], setup, row["recipe"], seed, args)[1]
                row["test"].append(test)
                row["test_mean"], row["test_spread"] = round(statistics.mean(row["test"]), 4), spread(row["test"])
                row["finetune_seconds"] = round(time.perf_counter() - start, 1)
                print(f"{budget['target']} seed {seed} {row['recipe']:>9}  {row['method']}: {row['test'][-1]}",
                      flush=True)
                save(f"{args.out}.partial", result)
    for budget in result["budgets"]:
        print(f"\n{args.model} at {100 * budget['target']:.0f}% of the FLOPs: fine-tuned {args.steps} steps of "
              f"{BATCH}, {args.seeds} seeds, {args.test_images} test images")
        print(table(budget["rows"], ["method", "recipe", "flops_pct", "params", "heldout_after_adaptive_bn",
                                     "test_mean", "test_spread", "seconds_to_strategy", "candidates"]))
    print("saved", save(args.out, result))
    os.remove(results_path(f"{args.out}.partial.json"))  # the whole result is saved


if __name__ == "__main__":
    main()
