"""The run report: the summary, report.md (a recommendation, then tables), and a PNG with two scatter plots."""
from __future__ import annotations

import os

from prunetune.workers.files import write_text
from prunetune.workers.latency import LayerCost, describe_costs
from prunetune.workers.methods import METHODS
from prunetune.workers.record import CandidateRecord, best
from prunetune.workers.tasks import short_name
from prunetune.workers.timing import UNSTABLE_SPREAD

from .baselines import BASELINES
from .rundir import RunDir
from .runfiles import FinalModel, Summary, Timings, read_summary, summary_path, write
from .store import CandidateStore


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _latency(entry: Timings) -> str:
    """Median latency with its spread (and the table's prediction); marked when the spread says the machine was
    too busy to trust it."""
    median, iqr = entry.latency_ms_batch1, entry.latency_iqr_ms
    shaky = " (unstable)" if _unstable(entry) else ""
    predicted = f" (predicted {entry.latency_predicted_ms:.3g})" if entry.latency_predicted_ms else ""
    return f"{median:.3g} ms ± {iqr / 2:.2g}{shaky}{predicted}"


def _size(size_mb: float | None) -> str:
    """A model file's size (n/a where it is not known)."""
    return f"{size_mb:.3f} MB" if size_mb is not None else "n/a"


def int8_table(summary: Summary) -> str:
    """fp32 vs int8 ONNX of every final model exported with `--quantize int8` (empty if none was)."""
    rows = [(f, f.int8) for f in summary.final if f.int8]
    if not rows:
        return ""
    lines = ["## int8 (ONNX Runtime static quantization)", "",
             "| model | fp32 test acc | int8 test acc | fp32 size | int8 size | fp32 latency | int8 latency | "
             "written |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for f, q in rows:
        lines.append(f"| rank{f.rank}.pt | {_pct(q.fp32.test_accuracy)} | {_pct(q.test_accuracy)} | "
                     f"{q.fp32.size_mb:.2f} MB | {q.size_mb:.2f} MB | "
                     f"{q.fp32.latency_ms_batch1:.3g} ms | "
                     f"{q.latency_ms_batch1:.3g} ms | {'yes' if q.written else 'no: over the accuracy margin'} |")
    return "\n".join(lines + ["", "ONNX Runtime on this CPU, batch 1, the configured threads; accuracy on the test "
                              "split given as raw pixel values.", ""])


def sparsity_section(summary: Summary) -> str:
    """The method's sparsity training: lambda, accuracy, and the penalised values before and after (empty if none)."""
    sp = summary.sparsity
    if not sp:
        return ""
    before, after = sp["gamma_before"], sp["gamma_after"]
    method, values = sp["method"], sp["values"]
    return "\n".join([
        f"## Sparsity training ({method})", "",
        f"{sp['epochs']} epochs with an L1 penalty {sp['lambda']:g} before the search: test accuracy "
        f"{_pct(sp['test_accuracy_before'])} before, {_pct(summary.base.test)} after (the base the "
        f"search pruned); median {values} {before['median']:.3g} before, {after['median']:.3g} after; "
        f"{METHODS[summary.granularity].units} with {values} < 0.01: {before['below_1e-2']} of "
        f"{before['channels']} before, {after['below_1e-2']} after.", "",
        f"![{values} before and after sparsity training](report-gamma.png)", ""])


def _plot_gammas(path: str, sparsity: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("gamma_before", "before"), ("gamma_after", "after")):
        h = sparsity[key]
        ax.stairs(h["counts"], h["edges"], label=f"{label} sparsity training")
    ax.set_xlabel(sparsity["values"])
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _unstable(entry: Timings) -> bool:
    """True when a latency figure's spread says the machine was too busy to trust its median."""
    return entry.latency_iqr_ms > UNSTABLE_SPREAD * entry.latency_ms_batch1


def speedup_range(base: Timings, model: Timings) -> tuple[float, float]:
    """The base's batch-1 latency over the model's, at the ends of both timings' spreads (median ± half the
    interquartile range): the speed-ups the timings cannot tell apart."""
    def ends(entry: Timings) -> tuple[float, float]:
        half = entry.latency_iqr_ms / 2
        return entry.latency_ms_batch1 - half, entry.latency_ms_batch1 + half

    (base_low, base_high), (low, high) = ends(base), ends(model)
    return base_low / high, (base_high / low if low > 0 else float("inf"))


def speed_claim(summary: Summary) -> str:
    """What the timings say about the recommended model's batch-1 latency against the base's: a speed-up only when
    it lies outside the timing noise and the method can give one; a slow-down whenever it is measured."""
    base, top = summary.base, summary.final[0]
    method = METHODS.get(summary.granularity)
    model_ms, base_ms = top.latency_ms_batch1, base.latency_ms_batch1
    timed = f"{model_ms:.3g} ms against the base's {base_ms:.3g} ms on this machine"
    low, high = speedup_range(base, top)
    if high < 1:
        claim = f"batch-1 latency {model_ms / base_ms:.2f}x slower than the base's ({timed})"
    elif low <= 1:
        what = "speed-up" if model_ms <= base_ms else "slow-down"
        claim = f"no measurable batch-1 {what} ({timed}, within the timing noise)"
    elif method is not None and not method.latency:
        claim = (f"no batch-1 speed-up claimed: {method.title} is not expected to run faster than the dense base "
                 f"({timed})")
    else:
        claim = f"batch-1 latency {base_ms / model_ms:.2f}x faster than the base's ({timed})"
    if _unstable(base) or _unstable(top):
        claim += (f"; the timings are unstable (spread over {100 * UNSTABLE_SPREAD:.0f}% of the median: the machine "
                  "was busy), time again on a quiet machine")
    return claim


def recommendation(summary: Summary) -> str:
    """One line: the model to take, its accuracy and what it loses against the base, what it saves, and what the
    timings say about its speed."""
    base, top, metric = summary.base, summary.final[0], summary.metric
    change = 100 * (top.test - base.test)
    versus = (f"{abs(change):.2f} points {'below' if change < 0 else 'above'} the base's "
              if abs(change) >= 0.005 else "equal to the base's ") + _pct(base.test)
    epoch = f", {kept(top)}" if top.kept_epoch is not None else ""
    return (f"**Recommended: `final/rank1.pt`** (candidate {top.candidate}{epoch}): test {metric} "
            f"{_pct(top.test)}, {versus}; {_pct(top.flops_ratio)} of the base's FLOPs and "
            f"{_pct(top.params / base.params)} of its params; {speed_claim(summary)}")


def kept(entry: FinalModel) -> str:
    """Which epoch a final model is: fine-tuned (epoch k), or flagged as the pruned network before fine-tuning."""
    epoch = entry.kept_epoch
    if epoch is None:
        return "kept epoch unknown"
    return f"fine-tuned, epoch {epoch}" if epoch else "NOT fine-tuned: epoch 0, the pruned network before fine-tuning"


def _val(entry: FinalModel) -> str:
    """The validation figure with its margin (± the smallest difference it can tell apart)."""
    margin = entry.val_margin
    return _pct(entry.val) + (f" ± {100 * margin:.2f}" if margin is not None else "")


def ranking_note(summary: Summary) -> str:
    """How the finalists were ranked: the validation split, its margin, which are tied with the best and why the
    first of them leads (empty without a validation split)."""
    n, metric = summary.splits.validation, summary.metric
    if not n:
        return ""
    finals = summary.final
    lead = [f"rank{f.rank}.pt" for f in finals if f.tied_with_best]
    rule = ("binomial: 1.96 standard errors sqrt(p(1-p)/n), at least one image" if metric == "accuracy"
            else "one image's share of the figure")
    text = (f"Finalists are judged on their own validation split: {n} training images that neither trained a weight "
            f"nor chose a candidate; ± is the smallest difference it tells apart ({rule}). A fine-tuned epoch is "
            "kept unless epoch 0 is better by more than that.")
    if len(lead) > 1:
        text += (f" {', '.join(lead)} are not distinguishable from the best on validation; rank1.pt leads them by "
                 "the rule: fine-tuned before not fine-tuned, then the fewest FLOPs.")
    flagged = [f"rank{f.rank}.pt" for f in finals if f.kept_epoch == 0]
    if flagged:
        text += f" **Not fine-tuned** (epoch 0 kept): {', '.join(flagged)}."
    return text


def finals_lines(summary: Summary) -> list[str]:
    """One line per final model for the terminal: rank, candidate, kept epoch, validation and test figures."""
    short = short_name(summary.metric)
    tie = " (tied with the best)" if sum(f.tied_with_best for f in summary.final) > 1 else ""
    return [f"  rank{f.rank}.pt (candidate {f.candidate}, {kept(f)}): val {short} {_val(f)} "
            f"test {short} {_pct(f.test)}{tie if f.tied_with_best else ''}"
            for f in summary.final]


VAL_NOTE = ("val {short}: {metric} of the kept epoch on the finalists' validation split, a part of the training "
            "split no finalist was chosen or fine-tuned on; the base shows no such figure: a checkpoint you give was "
            "most likely trained on the whole training split (a base prunetune trains leaves the held-out and "
            "validation splits out).")


def finals_table(summary: Summary) -> str:
    """Markdown table of the fine-tuned models against the base model (early-stopped finalists marked)."""
    base, planned, metric = summary.base, summary.finetune.epochs, summary.metric
    batch, short = base.throughput_batch, short_name(metric)
    lines = [f"| model | val {short} | test {short} | test {short} vs base | kept epoch | epochs | FLOPs | params | "
             f"size on disk | latency (batch 1) | throughput (batch {batch}) |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
             f"| base | n/a | {_pct(base.test)} | | | | 100.00% "
             f"({base.flops / 1e6:.2f} M) | {base.params / 1e6:.3f} M | {_size(base.size_mb)} | {_latency(base)} | "
             f"{base.images_per_s:,.0f}/s |"]
    for f in summary.final:
        epochs = f"{f.epochs}" if f.epochs == planned else f"{f.epochs} of {planned} (stopped early)"
        epoch = {None: "n/a", 0: "0 (**NOT fine-tuned**)"}.get(f.kept_epoch, f.kept_epoch)
        lines.append(f"| rank{f.rank}.pt (candidate {f.candidate}) | {_val(f)} | "
                     f"{_pct(f.test)} | {100 * (f.test - base.test):+.2f} pts | "
                     f"{epoch} | {epochs} | {_pct(f.flops_ratio)} ({f.flops / 1e6:.2f} M) | "
                     f"{f.params / 1e6:.3f} M | {_size(f.size_mb)} | {_latency(f)} | {f.images_per_s:,.0f}/s |")
    return "\n".join(lines + ["", VAL_NOTE.format(short=short, metric=metric)])


def candidates_table(records: list[CandidateRecord], limit: int = 10) -> str:
    """Markdown table of the best candidates by adaptive-BN score, and where the baselines rank."""
    ranked = best(records, len(records))
    metric = next((next(iter(r.metrics)) for r in ranked if r.metrics), "accuracy")  # the task's, stored first
    lines = [f"| search rank | candidate | proposed by | score | held-out {short_name(metric)} | FLOPs | params |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for i, r in enumerate(ranked[:limit], 1):
        figure = r.metrics[metric] if r.metrics else r.accuracy
        lines.append(f"| {i} | {r.index} | {r.source or ''} | {r.score:.4f} | {_pct(figure)} | "
                     f"{_pct(r.flops_ratio)} ({r.flops / 1e6:.2f} M) | {r.params / 1e6:.3f} M |")
    ok = sum(r.ok for r in records)
    lines.append(f"\n{len(records)} candidates evaluated, {ok} ok, {len(records) - ok} failed.")
    places = [f"{r.source} ranks {i} of {len(ranked)} (score {r.score:.4f})" for i, r in enumerate(ranked, 1)
              if r.source in BASELINES]
    if places:
        lines.append("Baselines: " + "; ".join(places) + ".")
    if any(r.ok and r.bn_recalibrated is False for r in records):
        lines.append("The model has no BatchNorm layer: candidates were scored without recalibration.")
    return "\n".join(lines)


def figure(records: list[CandidateRecord], summary: Summary):
    """The report's figure: the base beside the candidates (its own small panel, so the candidates fill the next
    one), score vs FLOPs of the candidates, and adaptive-BN score vs fine-tuned validation accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok]
    finals, base, planned, metric = summary.final, summary.base, summary.finetune.epochs, summary.metric
    chosen = [r for r in ok if r.index in {f.candidate for f in finals}]
    fig, (overview, a, b) = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw={"width_ratios": [1, 2, 2]})
    overview.scatter([r.flops_ratio for r in ok], [r.score for r in ok], s=6, c="tab:gray")
    overview.scatter([1.0], [base.score], marker="*", s=120, c="black")
    overview.set_xlabel("FLOPs (fraction of base)")
    overview.set_ylabel("score on the held-out split")
    overview.set_title("base (star; scored on data it trained on)\nand candidates", fontsize=8)
    a.scatter([r.flops_ratio for r in ok], [r.score for r in ok], s=12, c="tab:gray", label="candidates")
    a.scatter([r.flops_ratio for r in chosen], [r.score for r in chosen], s=30, c="tab:red", label="fine-tuned")
    a.set_xlabel("FLOPs (fraction of base)")
    a.set_ylabel("score on the held-out split")
    a.set_title("candidates", fontsize=9)
    a.legend()
    for stopped in (False, True):
        shown = [f for f in finals if (f.epochs < planned) == stopped]
        b.scatter([f.adaptive_bn_score for f in shown], [f.val for f in shown], c="tab:red",
                  marker="x" if stopped else "o", label="stopped early" if stopped else f"{planned} epochs")
    b.set_xlabel("adaptive-BN score (before fine-tuning)")
    b.set_ylabel(f"val {metric} after fine-tuning")
    b.legend()
    fig.tight_layout()
    _label_finalists(b, finals)
    return fig


def _label_finalists(ax, finals: list[FinalModel]) -> None:
    """Each finalist's point labelled with its candidate number, a label moved up past the labels already placed
    (finalists with close figures would print over one another)."""
    renderer = ax.figure.canvas.get_renderer()
    placed = []
    for f in sorted(finals, key=lambda f: (f.val, f.adaptive_bn_score)):
        label = ax.annotate(f"#{f.candidate}", (f.adaptive_bn_score, f.val), xytext=(4, 4),
                            textcoords="offset points", fontsize=8)
        box = label.get_window_extent(renderer)
        while any(box.overlaps(other) for other in placed):
            label.xyann = (label.xyann[0], label.xyann[1] + box.height * 72 / ax.figure.dpi + 1)
            box = label.get_window_extent(renderer)
        placed.append(box)


def _plot(path: str, records: list[CandidateRecord], summary: Summary) -> None:
    import matplotlib.pyplot as plt

    fig = figure(records, summary)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_files(run: RunDir, summary: Summary) -> list[str]:
    """The files write_report writes (the run lists them in its manifest first)."""
    return [summary_path(run.path), os.path.join(run.path, "report.png"),
            *([os.path.join(run.path, "report-gamma.png")] if summary.sparsity else []),
            os.path.join(run.path, "report.md")]


def _runtime(summary: Summary) -> str:
    """The runtime the latency figures were timed in, as the report names it."""
    runtime = summary.latency.runtime
    return {"torch": "PyTorch", "onnxruntime": "ONNX Runtime"}.get(runtime, runtime)


def time_went(summary: Summary) -> list[str]:
    """The report's "Where the time went" section (a latency table's run): the recommended model's slowest layers,
    before and after pruning, and the layers whose channel counts cost speed; nothing without a table."""
    layers = summary.latency.layers
    if not layers:
        return []
    costs = [LayerCost(**{**c, "channels": tuple(c["channels"]), "full": tuple(c["full"])}) for c in layers]
    return ["## Where the time went (the recommended model, as the latency table predicts it)", "",
            describe_costs(costs), ""]


def write_report(run: RunDir, summary: Summary, records: list[CandidateRecord]) -> str:
    """Write the summary, report.png (report-gamma.png) and report.md; return the report path."""
    _, png, *gamma, path = report_files(run, summary)
    write(run.path, summary)
    _plot(png, records, summary)
    if gamma and summary.sparsity:
        _plot_gammas(gamma[0], summary.sparsity)
    s = summary.search
    method = METHODS.get(summary.granularity)
    note = method.report_note if method else None
    text = [f"# prunetune report: {run.path}", "", recommendation(summary), "",
            f"Target {_pct(s.target)} of base {s.constraint} (+- {_pct(s.tolerance)}); "
            f"{s.candidates} candidates ({s.ok} ok, {s.failed} failed); device {summary.device}.", "",
            "## Fine-tuned models (the recommended first)", "", finals_table(summary), "",
            *([ranking_note(summary), ""] if ranking_note(summary) else []),
            f"Latency: median of repeated batch-1 forward passes on this machine ({_runtime(summary)}, the configured "
            "threads), ± half the interquartile range; throughput: images per second at the throughput batch.", "",
            *time_went(summary),
            *([note, ""] if note else []),
            int8_table(summary), sparsity_section(summary),
            "## Best candidates by adaptive-BN score", "", candidates_table(records), "",
            f"![score vs FLOPs, and adaptive-BN score vs fine-tuned validation {summary.metric}](report.png)", ""]
    write_text(path, "\n".join(text))
    return path


def print_report(output_dir: str) -> str:
    """Text report of a run directory (works on unfinished runs; says what the manifest lists but is missing)."""
    run = RunDir(output_dir)
    manifest = run.manifest()
    store = CandidateStore(run.path)
    notes: list[str] = [f"{problem}; `prunetune resume {run.path}` evaluates its candidates again"
                        for problem in store.verify(manifest.candidates)]
    records = store.records(report=notes.append)
    stored = manifest.candidates.rows if manifest.candidates else len(records)
    if stored > len(records):
        notes.append(f"the manifest records {stored} stored candidates, {stored - len(records)} of them are missing")
    total = run.load_config().search.num_candidates
    out = [f"run {run.path}: stage {manifest.stage or 'unknown'}, {len(records)} of {total} candidates stored"]
    out += [f"warning: {n}" for n in dict.fromkeys(notes)]
    out += ["", "Best candidates by adaptive-BN score:", candidates_table(records)]
    summary = read_summary(run.path)
    if summary is not None:
        if summary.final:
            out += ["", recommendation(summary).replace("**", "").replace("`", "")]
        out += ["", "Fine-tuned models:", finals_table(summary), *([ranking_note(summary)] if ranking_note(summary)
                                                                    else [])]
        if int8_table(summary):
            out += ["", int8_table(summary).replace("## ", "")]
    return "\n".join(out)
