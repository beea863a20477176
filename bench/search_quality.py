"""Do the learning search algorithms find better strategies with fewer candidates? Real CIFAR-10, no Ray.

    python bench/search_quality.py --data /tmp/cifar10 [--checkpoint bench/checkpoints/resnet20-cifar10.pt]
        [--budget 200] [--seeds 0,1,2] [--algorithms random,evolution,tpe]

For each algorithm and seed: the two baselines (uniform, global threshold) and then `budget - 2` candidates the
algorithm proposes one at a time (a serial search, as with one concurrent trial), each pruned, recalibrated
(adaptive BN) and scored on a held-out split of the training images, at 50% +- 1% of the FLOPs. Prints and
saves the best-score-so-far curves (PNG), the candidates each algorithm needs to reach random search's best
score at the full budget (median over seeds), and the best score at a third of the budget and at the full
budget. Then the top-1 of random search and of the best learning algorithm (seed 0), and the two baselines, are
fine-tuned the same way and tested on the test split, so a higher score can be seen to be a better network.
Evaluations are cached by strategy (the algorithms share their random start). Partial results are kept in
bench/results/search_quality.partial.json, and a rerun continues from them.
`--smoke`: seconds, on a random digits_cnn and tiny synthetic data: one seed, 6 candidates per algorithm
(population 2), the finalists fine-tuned 1 epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (CIFAR_SMOKE, cifar_arguments, cifar_model, median, parse_args,  # noqa: E402
                          results_path, save, table)
from prunetune import (CandidateEvaluator, FinetuneOptions, PruningSpace, StrategySampler, finetune,  # noqa: E402
                       load_config)
from prunetune.search.algorithms import ALGORITHMS  # noqa: E402
from prunetune.search.baselines import Ranking, baselines  # noqa: E402
from prunetune.workers.prune import position_importance  # noqa: E402
from prunetune.workers.record import CandidateRecord  # noqa: E402

def curve(scores: list[float]) -> list[float]:
    """Best score so far after each candidate."""
    return list(np.maximum.accumulate(scores))


def needed(scores: list[float], goal: float) -> int | None:
    """Candidates needed to reach `goal` (None if never)."""
    reached = np.flatnonzero(np.array(curve(scores)) >= goal - 1e-12)
    return int(reached[0]) + 1 if len(reached) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cifar_arguments(parser)
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--algorithms", default="random,evolution,tpe")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--calibration-batches", type=int, default=10)
    parser.add_argument("--heldout", type=int, default=2000)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--finetune-images", type=int, default=15000)
    parser.add_argument("--batch-size", type=int, default=1, help="B > 1: the learning algorithms propose B "
                        "candidates at a time, from the records before the batch (as search.batch_size does); "
                        "their rows are named NAME/bB")
    parser.add_argument("--out", default="search_quality", help="results name: bench/results/OUT.json (.png)")
    parser.add_argument("--reuse", help="a saved search_quality.json whose evaluated strategies need no new "
                        "evaluation (same settings)")
    args = parse_args(parser, {**CIFAR_SMOKE, "budget": 6, "seeds": "0", "population": 2, "calibration_batches": 2,
                               "heldout": 64, "finetune_epochs": 1, "finetune_images": 128}, require=("data",))
    partial_path = results_path(f"{args.out}.partial.json")
    data, model = cifar_model(args)
    space = PruningSpace.from_model(model, data.example_input())
    cfg = load_config(None, [f"evaluation.calibration_batches={args.calibration_batches}",
                             f"evaluation.heldout_size={args.heldout}", "evaluation.batch_size=128"])
    evaluator = CandidateEvaluator(model, space, data, cfg.evaluation.settings(), "cpu")
    importance = position_importance(model, space, "l1")
    settings = {k: getattr(args, k) for k in ("checkpoint", "model", "population", "calibration_batches", "heldout")}
    partial = json.load(open(partial_path)) if os.path.isfile(partial_path) else {}
    if partial.get("settings") != settings:  # scores of other settings are no use
        partial = {"settings": settings, "scores": {}, "runs": {}}
    cache: dict[str, dict] = partial["scores"]  # strategy -> {score, accuracy, flops_ratio, seconds}
    if args.reuse:
        saved = json.load(open(args.reuse))
        if {k: saved["args"].get(k) for k in settings} == settings:
            for run in saved["runs"].values():
                for r in run:
                    cache.setdefault(json.dumps([round(x, 10) for x in r["ratios"]]),
                                     {k: r[k] for k in ("score", "flops_ratio", "seconds")})

    def evaluate(ratios) -> dict:
        key = json.dumps([round(r, 10) for r in ratios])
        if key not in cache:
            start = time.perf_counter()
            record = evaluator.evaluate(ratios)
            cache[key] = {"score": record.score, "flops_ratio": record.flops_ratio,
                          "seconds": time.perf_counter() - start}
        return cache[key]

    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        sampler = StrategySampler(space, 0.5, 0.01, 0.7, seed=seed)
        starts = baselines(sampler, [Ranking("global threshold", importance, False)])
        for name in args.algorithms.split(","):
            batch = 1 if name == "random" else args.batch_size
            label = name if batch == 1 else f"{name}/b{batch}"
            run_key = f"{label}/{seed}"
            if run_key in partial["runs"]:
                continue
            algorithm = ALGORITHMS[name](sampler, args.population)
            run = []
            for horizon in range(0, args.budget, batch):  # a batch is proposed at once, then evaluated
                indices = range(horizon, min(horizon + batch, args.budget))
                proposed = [starts[i] if i < len(starts) else (name, algorithm.propose(i, horizon)) for i in indices]
                for index, (source, ratios) in zip(indices, proposed):
                    result = evaluate(ratios)
                    algorithm.observe(CandidateRecord(index, list(ratios), score=result["score"], flops=1))
                    run.append({"index": index, "source": source, "ratios": list(ratios), **result})
            partial["runs"][run_key] = run
            with open(partial_path, "w") as f:
                json.dump(partial, f)
            best_so_far = max(r["score"] for r in run)
            print(f"{run_key}: best score {best_so_far:.4f} after {args.budget} candidates "
                  f"({len(cache)} distinct evaluated)", flush=True)

    algorithms = [n if n == "random" or args.batch_size == 1 else f"{n}/b{args.batch_size}"
                  for n in args.algorithms.split(",")]
    runs = {k: [r["score"] for r in v] for k, v in partial["runs"].items()}
    rows = []
    for name in algorithms:
        reach = [needed(runs[f"{name}/{s}"], max(runs[f"random/{s}"])) for s in seeds]
        rows.append({"algorithm": name,
                     "best_at_third": median([max(runs[f"{name}/{s}"][: args.budget // 3]) for s in seeds]),
                     "best_at_budget": median([max(runs[f"{name}/{s}"]) for s in seeds]),
                     "candidates_to_random_best": median([r if r is not None else float("inf") for r in reach]),
                     "reached_in_seeds": sum(r is not None for r in reach)})
    learning = max((r for r in rows if r["algorithm"] != "random"), key=lambda r: r["best_at_third"], default=None)
    print(f"{args.model} on CIFAR-10, 50% +- 1% FLOPs, {args.budget} candidates, seeds {seeds}; "
          f"score = held-out accuracy after adaptive BN ({args.calibration_batches} batches of 128, "
          f"{args.heldout} held-out); medians over seeds")
    print(table(rows, list(rows[0])))
    _plot(runs, algorithms, seeds, args.budget, results_path(f"{args.out}.png"))

    finals = []
    chosen = [("random", max(partial["runs"]["random/0"], key=lambda r: r["score"]))]
    if learning is not None:
        chosen.append((learning["algorithm"], max(partial["runs"][f"{learning['algorithm']}/0"],
                                                  key=lambda r: r["score"])))
    chosen += [(r["source"], r) for r in partial["runs"]["random/0"][:2]]
    rest = evaluator.rest_indices[: args.finetune_images]
    ft = load_config(None, [f"finetune.epochs={args.finetune_epochs}", "finetune.lr=0.01", "finetune.batch_size=128",
                            "finetune.warmup_epochs=0"]).finetune.settings()
    for label, cand in chosen:
        pruned = evaluator.prune(cand["ratios"])
        evaluator.recalibrate(pruned)
        out = finetune(pruned, data, ft, FinetuneOptions(train_indices=rest, val_indices=evaluator.heldout_indices))
        finals.append({"top-1 of": label, "score": cand["score"], "flops_ratio": cand["flops_ratio"],
                       "val_accuracy": out["val_accuracy"], "test_accuracy": out["test_accuracy"]})
        print(table(finals[-1:], list(finals[-1])), flush=True)
    print(f"fine-tuned {args.finetune_epochs} epochs on {len(rest)} training images (lr 0.01), seed 0's top-1:")
    print(table(finals, list(finals[0])))
    print("saved", save(args.out, {"args": vars(args), "rows": rows, "finals": finals,
                                           "runs": partial["runs"]}))


def _plot(runs: dict, algorithms: list[str], seeds: list[int], budget: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in zip(algorithms, ("tab:gray", "tab:red", "tab:blue", "tab:green")):
        curves = np.array([curve(runs[f"{name}/{s}"]) for s in seeds])
        ax.plot(range(1, budget + 1), np.median(curves, 0), c=color, label=f"{name} (median of {len(seeds)} seeds)")
        ax.fill_between(range(1, budget + 1), curves.min(0), curves.max(0), color=color, alpha=0.15)
    ax.set_xlabel("candidates evaluated")
    ax.set_ylabel("best held-out score so far")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print("saved", path)


if __name__ == "__main__":
    main()
