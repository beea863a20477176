"""The run report: the summary, report.md (a recommendation, then tables), and a PNG with two scatter plots (and,
for a front, report-front.png: held-out score against FLOPs, params and predicted latency)."""
from __future__ import annotations

import os

from prunetune.workers.files import write_text
from prunetune.workers.latency import LayerCost, describe_costs
from prunetune.workers.methods import METHODS
from prunetune.workers.record import CandidateRecord, best
from prunetune.workers.tasks import short_name
from prunetune.workers.timing import RUNTIMES, UNSTABLE_SPREAD

from .baselines import BASELINES
from .rundir import RunDir
from .runfiles import FinalModel, Summary, Timings, read_summary, summary_path, write
from .store import CandidateStore


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _latency(entry: Timings, table_batch: int | None = None) -> str:
    """Median batch-1 latency with its spread, marked when the spread says the machine was too busy to trust it;
    with a latency table, the latency at the table's batch and the table's prediction of it."""
    median, iqr = entry.latency_ms_batch1, entry.latency_iqr_ms
    shaky = " (unstable)" if _unstable(entry) else ""
    predicted = ""
    if entry.latency_predicted_ms is not None and entry.latency_ms_budget_batch is not None:
        predicted = (f"; batch {table_batch}: {entry.latency_ms_budget_batch:.3g} ms, predicted "
                     f"{entry.latency_predicted_ms:.3g}")
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
            f"{_pct(top.params / base.params)} of its params; {speed_claim(summary)}{over_budget(top)}")


def over_budget(entry: FinalModel) -> str:
    """A final model's flag when timed over its latency budget (then every finalist was: those within lead)."""
    return ("; timed over the latency budget, as every finalist was (the latency table predicted it within: the "
            "table's error, or a busy machine; a lower search.target leaves a margin)") if entry.over_latency_budget \
        else ""


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
            f"{' (timed over the latency budget)' if f.over_latency_budget else ''}"
            for f in summary.final]


VAL_NOTE = ("val {short}: {metric} of the kept epoch on the finalists' validation split, a part of the training "
            "split no finalist was chosen or fine-tuned on; the base shows no such figure: a checkpoint you give was "
            "most likely trained on the whole training split (a base prunetune trains leaves the held-out and "
            "validation splits out).")


def finals_table(summary: Summary) -> str:
    """Markdown table of the fine-tuned models against the base model (early-stopped finalists marked)."""
    base, planned, metric = summary.base, summary.finetune.epochs, summary.metric
    batch, short = base.throughput_batch, short_name(metric)
    batch_of_table = summary.latency.batch_size
    lines = [f"| model | val {short} | test {short} | test {short} vs base | kept epoch | epochs | FLOPs | params | "
             f"size on disk | latency (batch 1) | throughput (batch {batch}) |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
             f"| base | n/a | {_pct(base.test)} | | | | 100.00% "
             f"({base.flops / 1e6:.2f} M) | {base.params / 1e6:.3f} M | {_size(base.size_mb)} | "
             f"{_latency(base, batch_of_table)} | "
             f"{base.images_per_s:,.0f}/s |"]
    for f in summary.final:
        epochs = f"{f.epochs}" if f.epochs == planned else f"{f.epochs} of {planned} (stopped early)"
        epoch = {None: "n/a", 0: "0 (**NOT fine-tuned**)"}.get(f.kept_epoch, f.kept_epoch)
        lines.append(f"| rank{f.rank}.pt (candidate {f.candidate}) | {_val(f)} | "
                     f"{_pct(f.test)} | {100 * (f.test - base.test):+.2f} pts | "
                     f"{epoch} | {epochs} | {_pct(f.flops_ratio)} ({f.flops / 1e6:.2f} M) | "
                     f"{f.params / 1e6:.3f} M | {_size(f.size_mb)} | {_latency(f, batch_of_table)} | "
                     f"{f.images_per_s:,.0f}/s |")
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


_COSTS = (("flops_ratio", "FLOPs"), ("params_ratio", "params"), ("latency_ratio", "predicted latency"))


def target_line(summary: Summary) -> str:
    """The report's line on the budget and the candidates: one target +- its tolerance, or the front's budgets."""
    s = summary.search
    counts = f"{s.candidates} candidates ({s.ok} ok, {s.failed} failed); device {summary.device}."
    if not summary.front:
        return f"Target {_pct(s.target)} of base {s.constraint} (+- {_pct(s.tolerance)}); {counts}"
    points = summary.front.points
    budgets = ", ".join(f"{_pct(p.budget)} (+- {_pct(p.tolerance)})" for p in points)
    return f"Front of {len(points)} budgets of base {s.constraint}: {budgets}; {counts}"


def _share(value: float | None, ratio: float | None, unit: str, digits: str) -> str:
    return "n/a" if value is None else f"{value:{digits}} {unit} ({_pct(ratio)})"


def _millions(value: int | None) -> float | None:
    return None if value is None else value / 1e6


def front_table(summary: Summary) -> str:
    """Markdown table of the front: the base, then per budget its model (point K), its held-out score and costs,
    its fine-tuned figures, and the baselines' held-out scores at that budget."""
    assert summary.front is not None
    base, points = summary.base, summary.front.points
    short, timed = short_name(summary.metric), base.latency_predicted_ms is not None
    latency = " predicted latency |" if timed else ""
    lines = [f"| point | budget | candidate | proposed by | held-out score | FLOPs | params |{latency} model | "
             f"val {short} | test {short} | baselines here (held-out score) |",
             "|---:|---:|---:|---|---:|---:|---:|" + ("---:|" if timed else "") + "---|---:|---:|---|",
             f"| base | | | | {base.score:.4f} | {_share(base.flops / 1e6, 1.0, 'M', '.2f')} | "
             f"{_share(base.params / 1e6, 1.0, 'M', '.3f')} |"
             + (f" {_share(base.latency_predicted_ms, 1.0, 'ms', '.3g')} |" if timed else "")
             + f" | n/a | {_pct(base.test)} | |"]
    for p in points:
        if p.candidate is None:
            lines.append(f"| {p.point} | {_pct(p.budget)} | no candidate in this budget |" + " |" * (8 + timed))
            continue
        rules = "; ".join(f"{name} {b.score:.4f}" for name, b in p.baselines.items())
        model = f"rank{p.rank}.pt" if p.rank else "none"
        lines.append(f"| {p.point} | {_pct(p.budget)} | {p.candidate} | {p.source or ''} | "
                     f"{p.score:.4f} | {_share(_millions(p.flops), p.flops_ratio, 'M', '.2f')} | "
                     f"{_share(_millions(p.params), p.params_ratio, 'M', '.3f')} |"
                     + (f" {_share(p.latency_predicted_ms, p.latency_ratio, 'ms', '.3g')} |" if timed else "")
                     + f" {model} | {_pct(p.val)} | {_pct(p.test)} | {rules} |")
    return "\n".join(lines)


def front_lines(summary: Summary) -> list[str]:
    """One line per point of the front for the terminal: budget, candidate, held-out score, costs, model file."""
    assert summary.front is not None
    lines = []
    for p in summary.front.points:
        head = f"  point {p.point} (budget {_pct(p.budget)})"
        if p.candidate is None:
            lines.append(f"{head}: no candidate in this budget")
            continue
        model = f"rank{p.rank}.pt" if p.rank else "no fine-tuned model"
        lines.append(f"{head}: candidate {p.candidate}, score {p.score:.4f}, {_pct(p.flops_ratio)} of base "
                     f"FLOPs, {_pct(p.params_ratio)} of its params: {model}")
    return lines


def front_figure(records: list[CandidateRecord], summary: Summary):
    """The front's figure: held-out score against each cost (FLOPs, params, predicted latency with a latency table),
    the candidates in grey, each baseline rule's points, the front's points (numbered) and the base (star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert summary.front is not None
    base, points = summary.base, [p for p in summary.front.points if p.candidate is not None]
    costs = [(key, name) for key, name in _COSTS if key != "latency_ratio" or base.latency_predicted_ms]
    ok = [r for r in records if r.ok]
    spent = {"flops_ratio": [r.flops / base.flops for r in ok],
             "params_ratio": [r.params / base.params for r in ok],
             "latency_ratio": [(r.latency_predicted_ms or 0.0) / (base.latency_predicted_ms or 1.0) for r in ok]}
    fig, axes = plt.subplots(1, len(costs), figsize=(5 * len(costs), 4), squeeze=False)
    for ax, (key, name) in zip(axes[0], costs):
        ax.scatter(spent[key], [r.score for r in ok], s=8, c="lightgray", label="candidates")
        for rule, marker in zip(BASELINES, "sv^<>"):
            shown = [p.baselines[rule] for p in points if rule in p.baselines]
            if shown:
                ax.plot([getattr(b, key) for b in shown], [b.score for b in shown], marker=marker, lw=0.8, ms=5,
                        label=rule)
        ax.plot([getattr(p, key) for p in points], [p.score for p in points], "o-", c="tab:red", lw=2, label="front")
        for p in points:
            ax.annotate(str(p.point), (getattr(p, key), p.score), xytext=(4, -10), textcoords="offset points",
                        fontsize=8)
        ax.scatter([1.0], [base.score], marker="*", s=150, c="black", label="base", zorder=3)
        ax.set_xlabel(f"{name} (fraction of base)")
        ax.set_ylabel("score on the held-out split")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


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


def _plot(path: str, records: list[CandidateRecord], summary: Summary, draw=figure) -> None:
    import matplotlib.pyplot as plt

    fig = draw(records, summary)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_files(run: RunDir, summary: Summary) -> list[str]:
    """The files write_report writes (the run lists them in its manifest first)."""
    return [summary_path(run.path), os.path.join(run.path, "report.png"),
            *([os.path.join(run.path, "report-gamma.png")] if summary.sparsity else []),
            *([os.path.join(run.path, "report-front.png")] if summary.front else []),
            os.path.join(run.path, "report.md")]


FRONT_NOTE = ("Each point is its budget's model: the first of the budget's fine-tuned finalists (search.top_k per "
              "budget) in the final order; held-out score: the adaptive-BN score before fine-tuning, as the search "
              "ranked it (the base's is on images it trained on). `prunetune export {run} --point K` (or "
              "`--budget X`) exports point K's model.")


def front_section(run: RunDir, summary: Summary) -> list[str]:
    """The report's front section (a run whose target is a range or a list of budgets); nothing otherwise."""
    if not summary.front:
        return []
    return ["## The accuracy-vs-cost front", "", front_table(summary), "", FRONT_NOTE.format(run=run.path), "",
            "![held-out score against each cost, the baselines and the base](report-front.png)", ""]


def _runtime(summary: Summary) -> str:
    """The runtime the latency figures were timed in, as the report names it."""
    name = summary.latency.runtime
    return RUNTIMES[name].title if name in RUNTIMES else name


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
    _, png, *pictures, path = report_files(run, summary)
    write(run.path, summary)
    _plot(png, records, summary)
    if summary.sparsity:
        _plot_gammas(pictures[0], summary.sparsity)
    if summary.front:
        _plot(pictures[-1], records, summary, front_figure)
    method = METHODS.get(summary.granularity)
    note = method.report_note if method else None
    text = [f"# prunetune report: {run.path}", "", recommendation(summary), "",
            target_line(summary), "",
            *front_section(run, summary),
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
        if summary.front:
            out += ["", "The accuracy-vs-cost front:", front_table(summary), FRONT_NOTE.format(run=run.path)
                    .replace("`", "")]
        if int8_table(summary):
            out += ["", int8_table(summary).replace("## ", "")]
    return "\n".join(out)
