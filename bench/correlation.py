"""Does the adaptive-BN score rank candidates the way fine-tuning does? The CIFAR-10 ResNet-20 study.

Train (or load) a ResNet-20, sample N strategies at 50% FLOPs, score each with vanilla evaluation (inherited
BN statistics), EagleEye's EMA adaptive BN, cumulative adaptive BN (our default) and cumulative under bf16
autocast, fine-tune each for a few epochs, and report the Spearman/Kendall correlation of every score with
fine-tuned test accuracy, what picking by each score would have given, and uniform L1 pruning at the same FLOPs.
Per-candidate results are appended to a JSON-lines file as they finish, so an interrupted study resumes.

Data: an imagefolder with train/ and test/ (the shared CIFAR-10 JPEGs extracted, e.g. to /tmp/cifar10).
python bench/correlation.py --data /tmp/cifar10            # GPU-sized: the reference protocol
python bench/correlation.py --data /tmp/cifar10 --small    # CPU-sized: fewer epochs, batches and samples
python bench/correlation.py --from-results bench/results/correlation-small-inner-s0.json   # recompute the verdict
python bench/correlation.py --smoke    # seconds: ResNet-20 trained 1 epoch on tiny synthetic data, 3 candidates,
                                       # and the verdict recomputed from its saved file (--from-results)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import parse_args, save, smoke_data, smoke_dir, table  # noqa: E402
from prunetune import (CandidateEvaluator, FinetuneOptions, PruningSpace, StrategySampler, build_model,  # noqa: E402
                       finetune, load_config, load_data)
from prunetune.workers.data import heldout_split  # noqa: E402
from prunetune.workers.evaluator import resolve_device  # noqa: E402
from prunetune.workers.models import read_state_dict  # noqa: E402


@dataclass
class Protocol:
    base_epochs: int
    finetune_epochs: int
    finetune_subset: int | None  # training images per fine-tuning epoch (None: all 45k)
    heldout: int
    ema_batches: int
    cumulative_batches: int
    batch: int


PROTOCOLS = {
    "full": Protocol(base_epochs=50, finetune_epochs=6, finetune_subset=None, heldout=5000, ema_batches=100,
                     cumulative_batches=50, batch=128),
    "small": Protocol(base_epochs=15, finetune_epochs=2, finetune_subset=15000, heldout=2000, ema_batches=40,
                      cumulative_batches=20, batch=128),
    "smoke": Protocol(base_epochs=1, finetune_epochs=1, finetune_subset=128, heldout=64, ema_batches=4,
                      cumulative_batches=2, batch=32),
}


def inner_only_ignored(model: torch.nn.Module) -> list[str]:
    """Every conv that writes into a residual stream: pruning then touches only each block's inner channels."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and
            (n == "conv1" or n.endswith(".conv2") or n.endswith("downsample.0"))]


def spearman_kendall(x, y) -> tuple[float, float]:
    from scipy.stats import kendalltau, spearmanr

    return float(spearmanr(x, y).statistic), float(kendalltau(x, y).statistic)


def uniform_ratio(space: PruningSpace, target: float, max_ratio: float) -> float:
    """One ratio for every group whose FLOPs are closest to the target (bisection)."""
    lo, hi = 0.0, max_ratio
    for _ in range(50):
        mid = (lo + hi) / 2
        if space.flops([mid] * len(space.groups)) / space.base_flops > target:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda r: abs(space.flops([r] * len(space.groups)) / space.base_flops - target))


def candidates(log_path: str, space: PruningSpace, sampler, args) -> tuple[dict, list, float]:
    """The results already in `log_path` by index, the (index, ratios) still to evaluate (the uniform baseline as
    index -1, then args.candidates sampled strategies), and the uniform baseline's ratio."""
    done = {}
    if os.path.isfile(log_path):
        for line in open(log_path):
            rec = json.loads(line)
            done[rec["index"]] = rec
    uniform = uniform_ratio(space, args.target, args.max_ratio)
    todo = [(-1, [uniform] * len(space.groups))] + [(i, sampler.sample(i)) for i in range(args.candidates)]
    return done, [(i, ratios) for i, ratios in todo if i not in done], uniform


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data")
    p.add_argument("--from-results", metavar="JSON", help="recompute the verdict of a saved study and stop")
    p.add_argument("--small", action="store_true")
    p.add_argument("--candidates", type=int, default=30)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--max-ratio", type=float, default=0.8)
    p.add_argument("--all-groups", action="store_true", help="prune residual streams too (default: inner channels)")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--workdir", default=os.path.expanduser("~/.cache/prunetune/correlation"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scores-only", action="store_true",
                   help="no fine-tuning: only what each score prefers, group by group (minutes, not hours)")
    args = parse_args(p, {"candidates": 3})
    if args.from_results:
        return reverdict(args.from_results)
    if not args.data and not args.smoke:
        p.error("--data is required (an imagefolder with train/ and test/)")
    size = "smoke" if args.smoke else "small" if args.small else "full"
    proto = PROTOCOLS[size]
    device = resolve_device("cpu" if args.smoke else "auto")
    if args.smoke:
        args.workdir = os.path.join(smoke_dir(), "correlation")
    os.makedirs(args.workdir, exist_ok=True)
    tag = f"{size}-{'all' if args.all_groups else 'inner'}-s{args.seed}"
    tag += "-scores" if args.scores_only else ""
    if args.smoke:
        data = smoke_data(image_size=8, train_size=256)
    else:
        data = load_data("imagefolder", path=args.data, cache_dir=args.workdir)
    heldout, rest = heldout_split(len(data.train), proto.heldout, args.seed)
    cfg = load_config(None, [f"evaluation.heldout_size={proto.heldout}", f"evaluation.batch_size={proto.batch}",
                             f"evaluation.seed={args.seed}", "finetune.batch_size=128", "finetune.lr=0.1",
                             "finetune.weight_decay=5e-4", "finetune.warmup_epochs=1"])

    # 1. the base model, trained on the training split minus the held-out images (cached)
    model = build_model("resnet20", data.num_classes)
    base_path = os.path.join(args.workdir, f"resnet20-base-{proto.base_epochs}ep-h{proto.heldout}-s{args.seed}.pt")
    if os.path.isfile(base_path):
        model.load_state_dict(read_state_dict(base_path))
    else:
        start = time.time()
        result = finetune(model, data, replace(cfg.finetune.settings(), epochs=proto.base_epochs),
                          FinetuneOptions(device, train_indices=rest, checkpoint_path=base_path + ".train"))
        torch.save(model.state_dict(), base_path)
        print(f"base model: {proto.base_epochs} epochs in {time.time() - start:.0f}s, "
              f"test accuracy {result['test_accuracy']:.4f}", flush=True)
    model.eval()

    ignored = [] if args.all_groups else inner_only_ignored(model)
    space = PruningSpace.from_model(model, data.example_input(), ignored_layers=ignored)
    sampler = StrategySampler(space, args.target, args.tolerance, args.max_ratio, seed=args.seed)
    modes = {"vanilla": ("none", 1, False), "ema": ("ema", proto.ema_batches, False),
             "cumulative": ("cumulative", proto.cumulative_batches, False)}
    if not args.no_bf16:
        modes["cumulative_bf16"] = ("cumulative", proto.cumulative_batches, True)
    evaluators = {}
    for name, (mode, batches, bf16) in modes.items():
        ev_cfg = replace(cfg.evaluation.settings(), bn_mode=mode, calibration_batches=batches,
                         amp="bf16" if bf16 else "off")
        evaluators[name] = CandidateEvaluator(model, space, data, ev_cfg, device)
    ft_cfg = replace(cfg.finetune.settings(), lr=0.02, epochs=proto.finetune_epochs, warmup_epochs=0.0)
    subset = rest if proto.finetune_subset is None else rest[: proto.finetune_subset]

    # 2. candidates (and the uniform baseline as index -1), results appended as they finish
    log_path = os.path.join(args.workdir, f"candidates-{tag}.jsonl")
    done, todo, uniform = candidates(log_path, space, sampler, args)
    for index, ratios in todo:
        start = time.time()
        rec = {"index": index, "ratios": ratios, "flops_ratio": space.flops(ratios) / space.base_flops}
        for name, ev in evaluators.items():
            r = ev.evaluate(ratios)
            rec[name] = r.accuracy
            rec[f"{name}_loss"] = r.loss
        rec["finetuned"] = None
        if not args.scores_only:
            pruned = evaluators["cumulative"].prune(ratios)
            evaluators["cumulative"].recalibrate(pruned)
            torch.manual_seed(args.seed)
            out = finetune(pruned.float(), data, ft_cfg,
                           FinetuneOptions(device, train_indices=subset, log=open(os.devnull, "w")))
            rec["finetuned"] = out["test_accuracy"]
        rec["seconds"] = time.time() - start
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        done[index] = rec
        print(f"candidate {index:3d}: FLOPs {rec['flops_ratio']:.3f} vanilla {rec['vanilla']:.3f} ema {rec['ema']:.3f} "
              f"cumulative {rec['cumulative']:.3f} -> fine-tuned {rec['finetuned']} ({rec['seconds']:.0f}s)",
              flush=True)

    # 3. the verdict
    cands = [done[i] for i in range(args.candidates)]
    if args.scores_only:
        per_group = preferences(cands, list(evaluators))
        print(preference_table(per_group))
        print("saved", save(f"correlation-{tag}", {"args": vars(args), "protocol": proto.__dict__,
                                                   "per_group_spearman": per_group, "candidates": cands}))
        return
    rows, summary = verdict(cands, done[-1], list(evaluators))
    summary.update({"uniform_ratio": uniform, "groups": len(space.groups)})
    print(f"\nResNet-20 CIFAR-10, {args.candidates} candidates at {args.target} +- {args.tolerance} FLOPs, "
          f"{'all' if args.all_groups else 'inner-channel'} groups ({len(space.groups)}), max ratio {args.max_ratio}, "
          f"protocol {tag}: {proto}")
    report(rows, summary)
    path = save(f"correlation-{tag}", {"args": vars(args), "protocol": proto.__dict__, "rows": rows,
                                       "summary": summary, "candidates": [done[-1]] + cands})
    print("saved", path)
    if args.smoke:
        reverdict(path)


def verdict(cands: list[dict], uniform: dict, scores: list[str], seed: int = 0) -> tuple[list[dict], dict]:
    """Correlation of each score with fine-tuned accuracy (with a bootstrap 95% interval and a p-value)."""
    from scipy.stats import spearmanr

    finetuned = np.array([c["finetuned"] for c in cands])
    rng = np.random.default_rng(seed)
    resamples = np.array([rng.integers(0, len(cands), len(cands)) for _ in range(2000)])
    rows = []
    for name in scores:
        s = np.array([c[name] for c in cands])
        rho, tau = spearman_kendall(s, finetuned)
        boot = bootstrap_spearman(s, finetuned, resamples)
        order = np.argsort(-s, kind="stable")
        rows.append({"score": name, "spearman": rho,
                     "spearman_ci95": [float(v) for v in np.nanpercentile(boot, [2.5, 97.5])],
                     "spearman_p": float(spearmanr(s, finetuned).pvalue), "kendall": tau,
                     "top1_finetuned": float(finetuned[order[0]]), "best_of_top5": float(finetuned[order[:5]].max()),
                     "heldout_acc_min": float(s.min()), "heldout_acc_max": float(s.max())})
    summary = {"median_finetuned": float(np.median(finetuned)), "best_finetuned": float(finetuned.max()),
               "uniform_l1_finetuned": uniform["finetuned"], "candidates": len(cands)}
    summary["per_group_spearman"] = preferences(cands, ["finetuned", *scores])
    if "cumulative_bf16" in scores:
        summary["spearman_fp32_vs_bf16_scores"] = spearman_kendall([c["cumulative"] for c in cands],
                                                                   [c["cumulative_bf16"] for c in cands])[0]
    return rows, summary


def bootstrap_spearman(x: np.ndarray, y: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """Spearman's rho of x and y on each resample (a row of indices), all at once: Pearson's r of their average
    ranks, as scipy's spearmanr computes it (NaN where a resample's values are all equal)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x[resamples], axis=1), rankdata(y[resamples], axis=1)
    rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=1) / np.sqrt((rx ** 2).sum(axis=1) * (ry ** 2).sum(axis=1))


def preferences(cands: list[dict], keys: list[str]) -> dict[str, list[float]]:
    """Spearman of each group's pruning ratio with each key (a score, or fine-tuned accuracy): what it prefers."""
    from scipy.stats import spearmanr

    ratios = np.array([c["ratios"] for c in cands])
    return {key: [float(spearmanr(ratios[:, g], [c[key] for c in cands]).statistic) for g in range(ratios.shape[1])]
            for key in keys}


def preference_table(per_group: dict[str, list[float]]) -> str:
    """One row per group, one column per key of `preferences`."""
    groups = len(next(iter(per_group.values())))
    return table([{"group": g, **{k: v[g] for k, v in per_group.items()}} for g in range(groups)],
                 ["group", *per_group])


def report(rows: list[dict], summary: dict) -> None:
    """Print the verdict table and summary."""
    print(table(rows, ["score", "spearman", "spearman_ci95", "spearman_p", "kendall", "top1_finetuned",
                       "best_of_top5", "heldout_acc_min", "heldout_acc_max"]))
    print("Spearman of each group's ratio with fine-tuned accuracy and with each score:")
    print(preference_table(summary["per_group_spearman"]))
    print(json.dumps({k: v for k, v in summary.items() if k != "per_group_spearman"}, indent=1))


def reverdict(path: str) -> None:
    """Recompute the verdict of a saved study (results/correlation-*.json) in place."""
    saved = json.load(open(path))
    if "rows" not in saved:
        raise SystemExit(f"--from-results: {path} holds no fine-tuned accuracy (a --scores-only study)")
    uniform, cands = saved["candidates"][0], saved["candidates"][1:]
    rows, summary = verdict(cands, uniform, [r["score"] for r in saved["rows"]])
    saved["rows"], saved["summary"] = rows, {**saved["summary"], **summary}
    report(rows, saved["summary"])
    with open(path, "w") as f:
        json.dump(saved, f, indent=1)
    print("updated", path)


if __name__ == "__main__":
    main()
