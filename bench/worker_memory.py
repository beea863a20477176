"""A search worker's memory over a long search: RSS after candidates 1, 10, 50 and 200, with and without giving
freed heap back to the system after each candidate (glibc's malloc_trim), side by side, no Ray.

    python bench/worker_memory.py [--model resnet20] [--candidates 200] [--calibration-batches 10]
    python bench/worker_memory.py --smoke    # seconds: digits_cnn at 16 px, 12 candidates, 2 calibration batches

Each mode runs in its own process (one CandidateEvaluator, candidates 0..N-1 of one sampler) so neither
inherits the other's heap. Prints RSS per checkpoint and the growth from candidate 10, and saves JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import parse_args, save, table  # noqa: E402

CHECKPOINTS = (1, 10, 50, 100, 200)


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def one_mode(args) -> dict:
    """Evaluate the candidates in this process; RSS at each checkpoint."""
    from prunetune import CandidateEvaluator, PruningSpace, StrategySampler, build_model, load_config, load_data
    from prunetune.workers import evaluator as evaluator_module

    if not args.trim:
        evaluator_module.trim_memory = lambda: None
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_data("synthetic", image_size=args.image_size, num_classes=10, train_size=args.train_size, test_size=16)
    cfg = load_config(None, [f"evaluation.calibration_batches={args.calibration_batches}",
                             f"evaluation.heldout_size={args.heldout}"]).evaluation.settings()
    model = build_model(args.model, 10)
    space = PruningSpace.from_model(model, data.example_input())
    sampler = StrategySampler(space, 0.5, 0.02, 0.7)
    evaluator = CandidateEvaluator(model, space, data, cfg, "cpu")
    rss = {}
    for i in range(1, args.candidates + 1):
        evaluator.evaluate(sampler.sample(i), i)
        if i in CHECKPOINTS or i == args.candidates:
            rss[i] = rss_mib()
    return rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--calibration-batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=4096, help="synthetic training images")
    parser.add_argument("--heldout", type=int, default=500)
    parser.add_argument("--trim", type=int, choices=(0, 1), help=argparse.SUPPRESS)  # internal: one mode
    args = parse_args(parser, {"model": "digits_cnn", "candidates": 12, "calibration_batches": 2, "image_size": 16,
                               "train_size": 512, "heldout": 64})
    if args.trim is not None:
        print(json.dumps(one_mode(args)))
        return
    rows = []
    for trim in (0, 1):
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--candidates", str(args.candidates),
                               "--calibration-batches", str(args.calibration_batches), "--threads", str(args.threads),
                               "--image-size", str(args.image_size), "--train-size", str(args.train_size),
                               "--heldout", str(args.heldout), "--trim", str(trim)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"the trim={trim} process failed:\n{proc.stderr}")
        rss = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
        row = {"mode": "malloc_trim after each candidate" if trim else "no trim (glibc keeps freed heap)"}
        row.update({f"rss_mib_at_{k}": v for k, v in rss.items()})
        row["growth_from_10"] = rss[max(rss)] / rss[10] - 1
        rows.append(row)
    print(f"{args.model}, {args.image_size} px, {args.calibration_batches} calibration batches of 128, "
          f"{args.heldout} held-out, {args.threads} thread(s), candidates 1..{args.candidates}")
    print(table(rows, list(rows[0])))
    print("saved", save("worker_memory", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
