"""The run report: summary.json, report.md with tables, and a PNG with the two scatter plots."""
from __future__ import annotations

import json
import os

from prunetune.workers.files import write_json, write_text
from prunetune.workers.record import CandidateRecord, best

from .rundir import RunDir
from .store import CandidateStore


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def candidates_table(records: list[CandidateRecord], limit: int = 10) -> str:
    """Markdown table of the best candidates by adaptive-BN score (failed ones counted below it)."""
    top = best(records, limit)
    lines = ["| rank | candidate | score | held-out acc | FLOPs | params |", "|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(top, 1):
        lines.append(f"| {i} | {r.index} | {r.score:.4f} | {_pct(r.accuracy)} | "
                     f"{_pct(r.flops_ratio)} ({r.flops / 1e6:.2f} M) | {r.params / 1e6:.3f} M |")
    ok = sum(r.ok for r in records)
    lines.append(f"\n{len(records)} candidates evaluated, {ok} ok, {len(records) - ok} failed.")
    if any(r.ok and r.bn_recalibrated is False for r in records):
        lines.append("The model has no BatchNorm layer: candidates were scored without recalibration.")
    return "\n".join(lines)


def finals_table(summary: dict) -> str:
    """Markdown table of the fine-tuned models against the base model."""
    base = summary["base"]
    lines = ["| model | val acc | test acc | epochs | FLOPs | params | latency (batch 1) |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| base | | {_pct(base['test_accuracy'])} | | 100.00% ({base['flops'] / 1e6:.2f} M) | "
             f"{base['params'] / 1e6:.3f} M | {base['latency_ms_batch1']:.2f} ms |"]
    for f in summary["final"]:
        lines.append(f"| rank{f['rank']}.pt (candidate {f['candidate']}) | {_pct(f['val_accuracy'])} | "
                     f"{_pct(f['test_accuracy'])} | {f['epochs']} | {_pct(f['flops_ratio'])} "
                     f"({f['flops'] / 1e6:.2f} M) | {f['params'] / 1e6:.3f} M | {f['latency_ms_batch1']:.2f} ms |")
    return "\n".join(lines)


def _plot(path: str, records: list[CandidateRecord], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok]
    finals = summary["final"]
    chosen = [r for r in ok if r.index in {f["candidate"] for f in finals}]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.scatter([r.flops_ratio for r in ok], [r.score for r in ok], s=12, c="tab:gray", label="candidates")
    a.scatter([r.flops_ratio for r in chosen], [r.score for r in chosen], s=30, c="tab:red", label="top-k")
    a.set_xlabel("FLOPs (fraction of base)")
    a.set_ylabel("adaptive-BN score (held-out)")
    a.legend()
    b.scatter([f["adaptive_bn_score"] for f in finals], [f["test_accuracy"] for f in finals], c="tab:red")
    for f in finals:
        b.annotate(f"#{f['candidate']}", (f["adaptive_bn_score"], f["test_accuracy"]), fontsize=8)
    b.set_xlabel("adaptive-BN score")
    b.set_ylabel("fine-tuned test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run: RunDir, summary: dict, records: list[CandidateRecord]) -> str:
    """Write final/summary.json, report.md and report.png; return the report path."""
    write_json(os.path.join(run.final_path, "summary.json"), summary, durable=True)
    _plot(os.path.join(run.path, "report.png"), records, summary)
    s = summary["search"]
    text = [f"# prunetune report: {run.path}", "",
            f"Target {_pct(s['target'])} of base {s['constraint']} (+- {_pct(s['tolerance'])}); "
            f"{s['candidates']} candidates ({s['ok']} ok, {s['failed']} failed); device {summary['device']}.", "",
            "## Fine-tuned models (best validation accuracy first)", "", finals_table(summary), "",
            "## Best candidates by adaptive-BN score", "", candidates_table(records), "",
            "![score vs FLOPs, and adaptive-BN score vs fine-tuned accuracy](report.png)", ""]
    path = os.path.join(run.path, "report.md")
    write_text(path, "\n".join(text))
    return path


def print_report(output_dir: str) -> str:
    """Text report of a run directory (works on unfinished runs; says what the manifest lists but is missing)."""
    run = RunDir(output_dir)
    manifest = run.manifest()
    store = CandidateStore(run.path)
    notes: list[str] = [f"{problem}; `prunetune resume {run.path}` evaluates its candidates again"
                        for problem in store.verify(manifest.get("candidates", {}))]
    records = store.records(report=notes.append)
    stored = manifest.get("candidates", {}).get("rows", len(records))
    if stored > len(records):
        notes.append(f"the manifest records {stored} stored candidates, {stored - len(records)} of them are missing")
    total = run.load_config().search.num_candidates
    out = [f"run {run.path}: stage {manifest.get('stage', 'unknown')}, {len(records)} of {total} candidates stored"]
    out += [f"warning: {n}" for n in dict.fromkeys(notes)]
    out += ["", "Best candidates by adaptive-BN score:", candidates_table(records)]
    summary_path = os.path.join(run.final_path, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            out += ["", "Fine-tuned models:", finals_table(json.load(f))]
    return "\n".join(out)
