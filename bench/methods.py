"""The pruning methods side by side on real CIFAR-10, the same fine-tuning budget for all, no Ray.

    python bench/methods.py --data /tmp/cifar10 [--checkpoint bench/checkpoints/resnet20-cifar10.pt]
        [--candidates 16] [--finetune-epochs 2] [--finetune-images 10000] [--sparsity LAMBDA] [--sparsity-epochs 2]
        [--out methods]

Methods: channel search (EagleEye, at 50% FLOPs); channel search after Network Slimming's sparsity training;
Network Slimming's own global |gamma| threshold (on the sparsity-trained model); unstructured search and global
magnitude pruning at 30% of the non-zero params; stripe-wise search (SP) at 50% FLOPs. A search draws
`--candidates` strategies, scores each with adaptive BN and keeps the best; each method's model is fine-tuned
with the same recipe and budget; the table shows test accuracy, FLOPs, params (non-zero for unstructured),
size on disk and batch-1 CPU latency (1 thread, masks made permanent; every model and the base timed at the end,
interleaved, so all see the same machine). Saves bench/results/OUT.json.
`--smoke`: every method in seconds on a random ResNet-20 and tiny synthetic data (2 candidates, 1 epoch each).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (CIFAR_SMOKE, cifar_arguments, cifar_model, parse_args, save, table,  # noqa: E402
                          time_side_by_side)
from prunetune import CandidateEvaluator, FinetuneOptions, StrategySampler, finetune, load_config  # noqa: E402
from prunetune.search.baselines import global_threshold  # noqa: E402
from prunetune.workers.constraints import CONSTRAINTS  # noqa: E402
from prunetune.workers.data import iterate_batches  # noqa: E402
from prunetune.workers.prune import clone_module  # noqa: E402
from prunetune.workers.scoring import score  # noqa: E402
from prunetune.workers.criteria import BATCHNORM, CRITERIA  # noqa: E402
from prunetune.workers.methods import METHODS as PRUNING_METHODS  # noqa: E402
from prunetune.workers.sparsity import bn_scales, histogram, slimming_train  # noqa: E402

# name -> (granularity, criterion, constraint, target, sparsity-trained base, strategy: search | global)
METHODS = {
    "channel search (EagleEye)": ("channel", "l1", "flops", 0.5, False, "search"),
    "channel search after sparsity training": ("channel", "bn_scale", "flops", 0.5, True, "search"),
    "Network Slimming (global |gamma| threshold)": ("channel", "bn_scale", "flops", 0.5, True, "global"),
    "unstructured search": ("unstructured", "l1", "params", 0.3, False, "search"),
    "global magnitude (unstructured)": ("unstructured", "l1", "params", 0.3, False, "global"),
    "stripe-wise search (SP)": ("stripe", "l1", "flops", 0.5, False, "search"),
}


def size_mb(model, method) -> float:
    """Size of the state dict prunetune writes for the model (its method's packing: masks as bit masks plus values)."""
    buffer = io.BytesIO()
    torch.save(method.pack(model), buffer)
    return buffer.tell() / 2 ** 20


def test_accuracy(model, data) -> float:
    """Accuracy on the test split."""
    return score(model.eval(), iterate_batches(data.test, range(len(data.test)), 500))["accuracy"]


def gamma_summary(model) -> dict:
    """Median |gamma| and the fraction of BatchNorm channels below 1e-2 (what sparsity training changes)."""
    h = histogram(bn_scales(model))
    return {"median": round(h["median"], 4), "below_1e-2": round(h["below_1e-2"] / h["channels"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cifar_arguments(parser)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--calibration-batches", type=int, default=10)
    parser.add_argument("--heldout", type=int, default=2000)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--finetune-images", type=int, default=10000)
    parser.add_argument("--sparsity", type=float, default=0.01, help="lambda of the sparsity training (0.01: median "
                        "|gamma| of the ResNet-20 checkpoint 0.34 -> 0.27, test 87.2%% -> 86.2%%; 0.1 wrecks it: the "
                        "sweep in docs/bench/studies.md)")
    parser.add_argument("--sparsity-epochs", type=int, default=2)
    parser.add_argument("--out", default="methods", help="results name: bench/results/OUT.json")
    # smoke: resnet20 (digits_cnn's classifier holds too many of its weights for 30% of the params)
    args = parse_args(parser, {**CIFAR_SMOKE, "model": "resnet20", "candidates": 2, "calibration_batches": 2,
                               "heldout": 64, "finetune_epochs": 1, "finetune_images": 128, "sparsity_epochs": 1},
                      require=("data",))
    data, base = cifar_model(args)
    cfg = load_config(None, [f"evaluation.calibration_batches={args.calibration_batches}",
                             f"evaluation.heldout_size={args.heldout}"])
    ft = load_config(None, [f"finetune.epochs={args.finetune_epochs}", "finetune.lr=0.01", "finetune.batch_size=128",
                            "finetune.warmup_epochs=0"]).finetune.settings()
    subset = np.random.default_rng(0).permutation(len(data.train))[: args.finetune_images]
    result = {"args": vars(args), "base_test_accuracy": test_accuracy(base, data), "base_gammas": gamma_summary(base)}
    sparse = None
    rows, deployed = [], {}
    for name in args.methods.split(","):
        granularity, criterion, constraint, target, sparsity, how = METHODS[name]
        start = time.perf_counter()
        if sparsity and sparse is None:  # Network Slimming's sparsity training, once, on the fine-tuning budget
            sparse = clone_module(base, {})
            slimming_train(sparse, data, replace(ft, epochs=args.sparsity_epochs), args.sparsity,
                           FinetuneOptions(train_indices=subset))
            result.update(sparse_test_accuracy=test_accuracy(sparse, data), sparse_gammas=gamma_summary(sparse))
        model = (sparse if sparsity else base).eval()
        method = PRUNING_METHODS[granularity]
        space = method.space(model, data.example_input())
        sampler = StrategySampler(space, target, 0.01, 0.7, constraint=CONSTRAINTS[constraint])
        evaluator = CandidateEvaluator(model, space, data, cfg.evaluation.settings(), "cpu", criterion, method)
        if how == "global":
            importance = method.importance(model, space, criterion, 0)
            best = global_threshold(sampler, importance,
                                    method.comparable or CRITERIA[criterion].source == BATCHNORM)
        else:
            records = [evaluator.evaluate(sampler.sample(i), i) for i in range(args.candidates)]
            best = max(records, key=lambda r: r.score).ratios
        pruned = evaluator.prune(best)
        evaluator.recalibrate(pruned)
        finetune(pruned, data, ft, FinetuneOptions(train_indices=subset))
        deployed[name] = method.deployable(clone_module(pruned, {}))
        rows.append({"method": name, "test_accuracy": round(test_accuracy(pruned, data), 4),
                     "flops_ratio": round(space.flops(best) / space.base_flops, 4),
                     "params_ratio": round(space.params(best) / space.base_params, 4),
                     "size_mb": round(size_mb(pruned, method), 3),
                     "minutes": round((time.perf_counter() - start) / 60, 1)})
        print(table(rows[-1:], list(rows[-1])), flush=True)
        save(f"{args.out}.partial", {**result, "rows": rows})
    timed = time_side_by_side({"base": base, **deployed}, data.example_input(), threads=1)
    for row in rows:
        row["latency_ms"] = round(timed[row["method"]], 3)
    result["base_latency_ms"] = round(timed["base"], 3)
    print(f"\n{args.model} on CIFAR-10 (base {100 * result['base_test_accuracy']:.2f}% test, "
          f"{result['base_latency_ms']:.3f} ms); {args.candidates} candidates per search, fine-tuned "
          f"{args.finetune_epochs} epochs on {args.finetune_images} images")
    if sparse is not None:
        print(f"sparsity training (lambda {args.sparsity}, {args.sparsity_epochs} epochs): test "
              f"{100 * result['sparse_test_accuracy']:.2f}%, |gamma| {result['base_gammas']} -> "
              f"{result['sparse_gammas']}")
    print(table(rows, list(rows[0])))
    print("saved", save(args.out, {**result, "rows": rows}))


if __name__ == "__main__":
    main()
