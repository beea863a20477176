"""CandidateEvaluator against a naive EagleEye-style loop, same model, data and strategies, in one run.

The naive loop does per candidate what EagleEye's code does: reload the checkpoint, build the model, run a
full Torch-Pruning pass, build DataLoaders, recalibrate BN with EMA over 2N batches, score the held-out
split. The evaluator keeps everything on the device and uses cumulative BN over N batches (the default); it
is also timed with EMA over 2N batches to separate the infrastructure gain from the batch-count gain.

python bench/evaluator.py --model resnet56 --image-size 32            # CPU-sized defaults
python bench/evaluator.py --model resnet50 --image-size 224 --gpu     # GPU sizes: N=50 of 128, 10,000 held-out
python bench/evaluator.py --smoke    # seconds: resnet20 at 16 px, 2 candidates, N=2 of 16, 64 held-out, CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import median, parse_args, save, smoke_dir, table  # noqa: E402
from prunetune import (CandidateEvaluator, PrunePlan, PruningSpace, StrategySampler, build_model, load_config,  # noqa: E402
                       load_data, score)
from prunetune.workers.data import heldout_split  # noqa: E402
from prunetune.workers.evaluator import resolve_device  # noqa: E402
from tests.archs import resnet50  # noqa: E402
from tests.reference import metapruner  # noqa: E402


def make_model(name: str, classes: int) -> torch.nn.Module:
    return resnet50(classes) if name == "resnet50" else build_model(name, classes)


def naive_candidate(name, classes, ckpt, space, ratios, data, calib_idx, heldout_idx, batch, score_batch, device):
    """One candidate the EagleEye way; returns (prune, calibrate, score) seconds."""
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    model = make_model(name, classes)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    model = model.to(device)
    model = metapruner(model, space, PrunePlan(model, space, "l1"), ratios)
    sync()
    t1 = time.perf_counter()
    loader = DataLoader(Subset(data.train, list(calib_idx)), batch_size=batch, shuffle=False)
    model.train()
    with torch.no_grad():
        for x, _ in loader:
            model(x.to(device))
    sync()
    t2 = time.perf_counter()
    loader = DataLoader(Subset(data.train, list(heldout_idx)), batch_size=score_batch, shuffle=False)
    score(model, ((x.to(device), torch.as_tensor(y).to(device)) for x, y in loader))
    sync()
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet56", choices=["resnet56", "resnet20", "resnet50"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--gpu", action="store_true", help="GPU-sized workload (EagleEye's 100 batches of 128)")
    p.add_argument("--batches", type=int, help="N: cumulative calibration batches (naive EMA uses 2N)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--heldout", type=int)
    args = parse_args(p, {"model": "resnet20", "image_size": 16, "candidates": 2, "batches": 2, "batch_size": 16,
                          "heldout": 64})
    n = args.batches or (50 if args.gpu else 5)
    batch = args.batch_size or (128 if args.gpu else 32)
    heldout = args.heldout or (10_000 if args.gpu else 500)
    device = resolve_device("cpu" if args.smoke else "auto")
    classes = 1000 if args.model == "resnet50" else 10
    data = load_data("synthetic", image_size=args.image_size, num_classes=classes,
                     train_size=heldout + 2 * n * batch + 16, seed=0)
    torch.manual_seed(0)
    model = make_model(args.model, classes).eval()
    ckpt = os.path.join(smoke_dir() or tempfile.mkdtemp(), "base.pt")
    torch.save(model.state_dict(), ckpt)
    space = PruningSpace.from_model(model, data.example_input())
    sampler = StrategySampler(space, 0.5, 0.01, 0.7, seed=0)
    strategies = [sampler.sample(i) for i in range(args.candidates + 1)]  # one extra for warm-up
    overrides = [f"evaluation.heldout_size={heldout}", f"evaluation.batch_size={batch}",
                 f"evaluation.score_batch_size={min(500, heldout)}"]
    cumulative = load_config(None, overrides + [f"evaluation.calibration_batches={n}"]).evaluation.settings()
    ema = dataclasses.replace(cumulative, bn_mode="ema", calibration_batches=2 * n)
    t = time.perf_counter()
    evaluators = {"evaluator_cumulative": CandidateEvaluator(model, space, data, cumulative, device),
                  "evaluator_ema": CandidateEvaluator(model, space, data, ema, device)}
    setup_s = (time.perf_counter() - t) / 2
    hold, rest = heldout_split(len(data.train), heldout, 0)
    calib = rest[: 2 * n * batch]
    times = {k: [] for k in ("naive", *evaluators)}
    for i, ratios in enumerate(strategies):
        naive = naive_candidate(args.model, classes, ckpt, space, ratios, data, calib, hold, batch,
                                min(500, heldout), device)
        measured = {"naive": naive}
        for key, ev in evaluators.items():
            r = ev.evaluate(ratios)
            measured[key] = (r.t_prune, r.t_calibrate, r.t_score)
        if i == 0:
            continue  # warm-up candidate
        for key, parts in measured.items():
            times[key].append(parts)
    rows = []
    for key, parts in times.items():
        total = median([sum(t) for t in parts])
        rows.append({"path": key, "median_s": total, "candidates_per_s": 1 / total,
                     "prune_s": median([t[0] for t in parts]), "calibrate_s": median([t[1] for t in parts]),
                     "score_s": median([t[2] for t in parts]),
                     "speedup_vs_naive": median([sum(t) for t in times["naive"]]) / total})
    print(f"{args.model} {args.image_size}px on {device}: {args.candidates} candidates (+1 warm-up), "
          f"calibration N={n} (naive and ema: {2 * n}) of {batch}, held-out {heldout}; "
          f"evaluator set-up {setup_s:.2f}s once")
    print(table(rows, ["path", "median_s", "candidates_per_s", "prune_s", "calibrate_s", "score_s",
                       "speedup_vs_naive"]))
    name = f"evaluator-{args.model}-{args.image_size}-{device.type}"
    print("saved", save(name, {"args": vars(args), "device": str(device), "calibration_batches": n,
                               "batch_size": batch, "heldout": heldout, "setup_s": setup_s, "rows": rows}))


if __name__ == "__main__":
    main()
