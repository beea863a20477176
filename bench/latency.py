"""How well does the latency table predict, and does a latency budget buy faster models than a FLOPs budget?

    python bench/latency.py [--models resnet56:32,mobilenet_v1_224:224] [--strategies 50] [--threads 1]
                            [--runtime torch|onnxruntime] [--batch 1]
    python bench/latency.py --compare --data /tmp/cifar10 --checkpoint bench/checkpoints/resnet20-cifar10.pt

Prediction: for each model (random weights: latency does not depend on them), the latency table is built on
this CPU (batch 1, the given threads), then `--strategies` strategies drawn by the FLOPs sampler at targets
spread over 30-80% are pruned and timed whole with the same helper; the table prints the median and worst
|predicted - timed| / timed (and its signed mean: drift of the machine's speed since the table was built shows
as a bias); the same for the fraction of the base's latency (what budgets are written in), with the base timed
right beside each network so that drift cancels; and how much the same networks' timings move when timed a
second time (the noise floor no prediction can beat). Saves bench/results/latency.json (eager torch, batch 1), else
bench/results/latency-RUNTIME-bBATCH.json: `--runtime onnxruntime` times the layers, the fit and every strategy in
ONNX Runtime, as a deployment runs them.

Comparison (`--compare`): on a trained model, two searches of the same size at the same latency budget, one
with `search.constraint: latency`, one with FLOPs at the same fraction (the usual stand-in), each candidate
scored with adaptive BN (no Ray); the best-scored model of each and the base are timed side by side, interleaved.

`--smoke`: both, in seconds: the prediction on digits_cnn at 16 px (3 strategies), then the comparison on a random
digits_cnn and tiny synthetic data (3 candidates per search, the budget halfway between the most pruned network's
predicted latency and the base's, as a tiny network's table moves with the machine's load).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (CHECKPOINT, CIFAR_SMOKE, cifar_model, median, parse_args, save, table,  # noqa: E402
                          time_side_by_side)
from prunetune import CandidateEvaluator, PruningSpace, StrategySampler, build_model, load_config  # noqa: E402
from prunetune.workers.constraints import CONSTRAINTS  # noqa: E402
from prunetune.workers.latency import build_table  # noqa: E402
from prunetune.workers.prune import PrunePlan  # noqa: E402


def prediction(name: str, size: int, strategies: int, threads: int, runtime: str = "torch", batch: int = 1) -> dict:
    """Build the table of one model in `runtime` and compare its predictions with whole-network timings there."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3).eval()
    example = torch.zeros(batch, 3, size, size)
    space = PruningSpace.from_model(model, example[:1])
    start = time.perf_counter()
    space.latency = build_table(model, space, example, threads=threads, runtime=runtime)
    build_s = time.perf_counter() - start
    plan = PrunePlan(model, space)
    base_predicted = float(space.latency.predict(space, space.kept_batch(np.zeros((1, len(space.groups)))))[0])
    errors, fraction_errors, rows = [], [], []
    drawn = [np.array(StrategySampler(space, 0.3 + 0.5 * (i % 11) / 10, 0.02, 0.7, seed=i).sample(0))
             for i in range(strategies)]
    for ratios in drawn:
        predicted = float(space.latency.predict(space, space.kept_batch(ratios[None]))[0])
        base = space.latency.time(model, torch.device("cpu"), space.input_shape).median_ms  # alongside: no drift
        timed = space.latency.time(plan.apply(ratios), torch.device("cpu"), space.input_shape)
        errors.append(abs(predicted - timed.median_ms) / timed.median_ms)
        fraction = timed.median_ms / base
        fraction_errors.append(abs(predicted / base_predicted - fraction) / fraction)
        rows.append({"flops_ratio": space.flops(ratios) / space.base_flops, "predicted_ms": predicted,
                     "timed_ms": timed.median_ms, "iqr_ms": timed.iqr_ms, "base_timed_ms": base,
                     "predicted_fraction": predicted / base_predicted, "timed_fraction": fraction})
    retest = []  # the same networks timed again a minute later: the noise floor of any prediction
    for ratios, row in zip(drawn, rows):
        again = space.latency.time(plan.apply(ratios), torch.device("cpu"), space.input_shape).median_ms
        row["retimed_ms"] = again
        retest.append(abs(again - row["timed_ms"]) / row["timed_ms"])
    worst = int(np.argmax(errors))
    return {"model": f"{name} ({size} px)", "runtime": runtime, "batch": batch, "groups": len(space.groups),
            "layers": len(space.latency.layers), "fit_worst_error": round(space.latency.worst_error, 4),
            "table_s": round(build_s, 1), "base_ms": round(space.latency.base_ms, 3),
            "median_error": round(median(errors), 4), "worst_error": round(max(errors), 4),
            "worst_at_flops": round(rows[worst]["flops_ratio"], 3),
            "signed_mean_error": round(float(np.mean([(r["predicted_ms"] - r["timed_ms"]) / r["timed_ms"]
                                                      for r in rows])), 4),
            "fraction_median_error": round(median(fraction_errors), 4),
            "fraction_worst_error": round(max(fraction_errors), 4), "retest_median": round(median(retest), 4),
            "retest_worst": round(max(retest), 4), "unstable_timings": sum(
                r["iqr_ms"] > 0.25 * r["timed_ms"] for r in rows), "strategies": rows}


def compare(args) -> dict:
    """Latency-budget search vs FLOPs-budget search at the same fraction, best models timed side by side."""
    cfg = load_config(None, [f"evaluation.calibration_batches={args.calibration_batches}",
                             f"evaluation.heldout_size={args.heldout}"])
    data, model = cifar_model(args)
    space = PruningSpace.from_model(model, data.example_input())
    space.latency = build_table(model, space, space.example_input(1), threads=args.threads)
    if args.smoke:  # a tiny network's table moves with the machine's load: aim at the middle of what it reaches
        most_pruned = space.kept_batch(np.full((1, len(space.groups)), 0.7))
        args.budget = round((1 + float(CONSTRAINTS["latency"].fraction(space, most_pruned)[0])) / 2, 3)
    evaluator = CandidateEvaluator(model, space, data, cfg.evaluation.settings(), "cpu")
    found = {}
    for constraint in ("latency", "flops"):
        sampler = StrategySampler(space, args.budget, 0.02, 0.7, seed=0, constraint=CONSTRAINTS[constraint])
        records = [evaluator.evaluate(sampler.sample(i), i) for i in range(args.candidates)]
        top = max(records, key=lambda r: r.score)
        found[constraint] = {"best_score": top.score, "ratios": top.ratios, "flops_ratio": top.flops_ratio,
                             "predicted_ms": top.latency_predicted_ms,
                             "timed_in_search_ms": [r.latency_ms for r in records]}
    nets = {"base": model, **{c: evaluator.prune(found[c]["ratios"]) for c in found}}
    timed = time_side_by_side(nets, space.example_input(1), args.threads)
    base_ms = timed["base"]
    for c in found:
        found[c]["timed_ms"] = timed[c]
        found[c]["latency_ratio"] = found[c]["timed_ms"] / base_ms
    return {"budget": args.budget, "candidates": args.candidates, "base_ms": base_ms, **found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet56:32,mobilenet_v1_224:224")
    parser.add_argument("--strategies", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--data", help="CIFAR-10 image folder (--compare)")
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="trained state dict (--compare)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--calibration-batches", type=int, default=10)
    parser.add_argument("--heldout", type=int, default=2000)
    args = parse_args(parser, {**CIFAR_SMOKE, "models": "digits_cnn:16", "strategies": 3, "candidates": 3,
                               "calibration_batches": 2, "heldout": 64})
    if args.compare and not args.data and not args.smoke:
        parser.error("--compare needs --data (the CIFAR-10 image folder)")
    torch.set_num_threads(args.threads)
    if args.compare:
        return report_comparison(args)
    results = []
    for spec in args.models.split(","):
        name, size = spec.split(":")
        results.append(prediction(name, int(size), args.strategies, args.threads, args.runtime, args.batch))
        print(table(results[-1:], COLUMNS), flush=True)
    print(table(results, COLUMNS))
    name = "latency" if (args.runtime, args.batch) == ("torch", 1) else f"latency-{args.runtime}-b{args.batch}"
    print("saved", save(name, {"threads": args.threads, "strategies": args.strategies, "runtime": args.runtime,
                               "batch": args.batch, "results": results}))
    if args.smoke:
        report_comparison(args)


COLUMNS = ["model", "runtime", "batch", "groups", "layers", "table_s", "base_ms", "fit_worst_error", "median_error",
           "worst_error", "signed_mean_error", "fraction_median_error", "fraction_worst_error", "retest_median",
           "retest_worst"]


def report_comparison(args) -> None:
    """Run the comparison, print its table and save it."""
    result = compare(args)
    print(table([{"search": c, **{k: v for k, v in result[c].items() if k not in ("ratios", "timed_in_search_ms")}}
                 for c in ("latency", "flops")],
                ["search", "best_score", "flops_ratio", "predicted_ms", "timed_ms", "latency_ratio"]))
    print(f"base {result['base_ms']:.3f} ms (timed beside them); budget {result['budget']} of the base")
    print("saved", save(f"latency-compare-{args.budget:g}", result))


if __name__ == "__main__":
    main()
