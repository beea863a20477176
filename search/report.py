"""The run report: summary.json, report.md with tables, and a PNG with the two scatter plots."""
from __future__ import annotations

import json
import os

from .rundir import RunDir
from .store import CandidateStore


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def candidates_table(rows: list[dict], limit: int = 10) -> str:
    """Markdown table of the best candidates by adaptive-BN score (failed ones counted below it)."""
    from .tune_search import rank_key

    ok = sorted((r for r in rows if r["status"] == "ok"), key=rank_key)
    lines = ["| rank | candidate | score | held-out acc | FLOPs | params |", "|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(ok[:limit], 1):
        lines.append(f"| {i} | {r['index']} | {r['score']:.4f} | {_pct(r['accuracy'])} | "
                     f"{_pct(r['flops_ratio'])} ({r['flops'] / 1e6:.2f} M) | {r['params'] / 1e6:.3f} M |")
    failed = len(rows) - len(ok)
    lines.append(f"\n{len(rows)} candidates evaluated, {len(ok)} ok, {failed} failed.")
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


def _plot(path: str, rows: list[dict], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    finals = summary["final"]
    chosen = {f["candidate"] for f in finals}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.scatter([r["flops_ratio"] for r in ok], [r["score"] for r in ok], s=12, c="tab:gray", label="candidates")
    a.scatter([r["flops_ratio"] for r in ok if r["index"] in chosen], [r["score"] for r in ok if r["index"] in chosen],
              s=30, c="tab:red", label="top-k")
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


def write_report(run: RunDir, summary: dict, rows: list[dict], top: list[dict]) -> str:
    """Write final/summary.json, report.md and report.png; return the report path."""
    os.makedirs(run.final_path, exist_ok=True)
    with open(os.path.join(run.final_path, "summary.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(run.final_path, "summary.json.tmp"), os.path.join(run.final_path, "summary.json"))
    _plot(os.path.join(run.path, "report.png"), rows, summary)
    s = summary["search"]
    text = [f"# prunetune report: {run.path}", "",
            f"Target {_pct(s['flops_target'])} of base FLOPs (+- {_pct(s['tolerance'])}); "
            f"{s['candidates']} candidates ({s['ok']} ok, {s['failed']} failed); device {summary['device']}.", "",
            "## Fine-tuned models (best validation accuracy first)", "", finals_table(summary), "",
            "## Best candidates by adaptive-BN score", "", candidates_table(rows), "",
            "![score vs FLOPs, and adaptive-BN score vs fine-tuned accuracy](report.png)", ""]
    path = os.path.join(run.path, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(text))
    os.replace(path + ".tmp", path)
    return path


def print_report(output_dir: str) -> str:
    """Text report of a run directory (works on unfinished runs and skips damaged result parts)."""
    run = RunDir(output_dir)
    notes: list[str] = []
    rows = sorted(CandidateStore(run.path).read(report=notes.append).to_pylist(), key=lambda r: r["index"])
    manifest = run.manifest()
    total = run.load_config().search.num_candidates if os.path.isfile(run.config_path) else "?"
    out = [f"run {run.path}: stage {manifest.get('stage', 'unknown')}, {len(rows)} of {total} candidates stored"]
    out += [f"warning: {n}" for n in notes]
    out += ["", "Best candidates by adaptive-BN score:", candidates_table(rows)]
    summary_path = os.path.join(run.final_path, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            out += ["", "Fine-tuned models:", finals_table(json.load(f))]
    return "\n".join(out)
