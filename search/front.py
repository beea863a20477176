"""The accuracy-vs-cost front of a run whose search.target is a range or a list of budgets.

Every candidate belongs to one budget (the band its measure is in: `StrategySampler.budget_of`); the fine-tuning
stage takes the best `search.top_k` of each budget (`finalists`); the summary's `front` has one point per budget,
rising: the budget's best fine-tuned model (the first of its finalists in the final order), with its held-out score,
FLOPs, params and predicted latency, and the baselines at that budget beside it. `prunetune export RUN --point K`
(or `--budget X`) exports point K's model file (`point_rank`).
"""
from __future__ import annotations

import numpy as np

from prunetune.workers.record import CandidateRecord, best, best_networks

from .baselines import BASELINES
from .config_file import ConfigError
from .runfiles import BaseFigures, FinalModel, Front, FrontCost, FrontPoint, Summary
from .sampler import StrategySampler


def budget_indices(sampler: StrategySampler, records: list[CandidateRecord]) -> list[int]:
    """The budget (index into sampler.bands) of each record."""
    if not records:
        return []
    return [int(b) for b in sampler.budget_of(np.array([r.ratios for r in records], dtype=np.float64))]


def finalists(sampler: StrategySampler, records: list[CandidateRecord], k: int) -> list[CandidateRecord]:
    """The candidates the fine-tuning stage takes, best first: the k best that prune to different networks
    (`best_networks`), and with several budgets the k best of each."""
    if len(sampler.bands) == 1:
        return best_networks(records, k)
    ok = [r for r in records if r.ok]
    where = budget_indices(sampler, ok)
    chosen = [r for b in range(len(sampler.bands)) for r in best_networks([r for r, i in zip(ok, where) if i == b], k)]
    return best(chosen, len(chosen))


def _figures(record: CandidateRecord, base: BaseFigures) -> dict:
    """A candidate's place on the front (FrontCost's fields): its held-out score and costs, as fractions of the
    base's too."""
    predicted = base.latency_predicted_ms
    return {"candidate": record.index, "source": record.source, "score": record.score, "flops": record.flops,
            "flops_ratio": record.flops / base.flops, "params": record.params,
            "params_ratio": record.params / base.params, "latency_predicted_ms": record.latency_predicted_ms,
            "latency_ratio": record.latency_predicted_ms / predicted
            if record.latency_predicted_ms is not None and predicted else None}


def front_summary(sampler: StrategySampler, records: list[CandidateRecord], finals: list[FinalModel],
                  base: BaseFigures) -> Front:
    """The summary's `front`: per budget, rising, its point (the best fine-tuned model of the budget, else its best
    candidate, with no model) and the best candidate of each baseline rule at that budget."""
    ok = [r for r in records if r.ok and r.within_budget is not False]
    where = dict(zip((r.index for r in ok), budget_indices(sampler, ok)))
    points = []
    for b, ((budget, half), band) in enumerate(zip(sampler.budgets, sampler.bands)):
        mine = [r for r in ok if where[r.index] == b]
        final = next((f for f in finals if where.get(f.candidate) == b), None)  # finals: in their final order
        top = next((r for r in mine if r.index == final.candidate), None) if final else next(iter(best(mine, 1)),
                                                                                            None)
        points.append(FrontPoint(point=b + 1, budget=budget, tolerance=half, band=list(band),
                                 **(_figures(top, base) if top else {"candidate": None}),
                                 rank=final.rank if final else None, path=final.path if final else None,
                                 val=final.val if final else None, test=final.test if final else None,
                                 baselines={name: FrontCost(**_figures(rule[0], base)) for name in BASELINES
                                            for rule in [best([r for r in mine if r.source == name], 1)] if rule}))
    return Front(constraint=sampler.constraint.name, points=points)


def point_rank(summary: Summary, point: int | None, budget: float | None) -> int:
    """The final model rank (final/rankN.pt) of front point `point` (1, 2, ...) or of the point at `budget`;
    ConfigError naming the option when the run has no front, no such point, or the point has no model."""
    option = "--point" if point is not None else "--budget"
    if not summary.front:
        raise ConfigError(f"{option}: the run has no front (its search.target is one budget); use --rank")
    points = summary.front.points
    if point is not None:
        if not 1 <= point <= len(points):
            raise ConfigError(f"--point: {point} is not a point of the front; it has points 1 to {len(points)}")
        chosen = points[point - 1]
    else:
        found = next((p for p in points if abs(p.budget - budget) < 1e-9), None) if budget is not None else None
        if found is None:
            raise ConfigError(f"--budget: {budget:g} is not a budget of the front; its budgets are "
                              f"{', '.join(format(p.budget, 'g') for p in points)}")
        chosen = found
    if chosen.rank is None:
        why = (f"its candidate {chosen.candidate} has no fine-tuned model (its fine-tuning failed): "
               f"`prunetune finetune RUN --candidate {chosen.candidate}` fine-tunes it"
               if chosen.candidate is not None else "no candidate landed in its budget")
        raise ConfigError(f"{option}: point {chosen.point} (budget {chosen.budget:g}) has no model; {why}")
    return chosen.rank
