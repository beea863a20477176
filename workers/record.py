"""The candidate (one strategy to evaluate) and its record (the strategy evaluated): the two shapes a search shares.

The searcher hands out Candidates, Tune carries them in a trial's config to the worker, which evaluates each one.
The evaluator fills the record, the trial adds where it ran, Tune carries it as the trial's result, the store writes it
as a Parquet row (the schema is derived from these fields), and the leaderboard, the fine-tuning stage and the
report read it back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """One strategy to evaluate: its number in the search, one pruning ratio per group, and who proposed it."""

    index: int
    ratios: tuple[float, ...]
    source: str  # the search algorithm, or a baseline (uniform, global threshold)
    latency_budget_ms: float | None = None  # its latency bound, when a budget names latency (its own budget's band)

    def failed(self, error: str) -> "CandidateRecord":
        """The record of this candidate when its evaluation failed (or never finished) with `error`."""
        record = CandidateRecord.failed(self.index, self.ratios, error)
        record.source = self.source
        return record


@dataclass
class CandidateRecord:
    """One candidate: its strategy, what it costs, how it scored, and where and how long it ran."""

    index: int  # candidate number within the search (candidate i of the sampler's seed for random search)
    ratios: list[float] = field(default_factory=list)  # the strategy: one pruning ratio per group
    status: str = "ok"  # ok | failed
    error: str | None = None
    source: str | None = None  # who proposed it: the search algorithm, or a baseline (uniform, global threshold)
    kept_units: list[int] | None = None  # per group, the units it keeps (channels, weights or stripes)
    flops: int | None = None
    flops_ratio: float | None = None
    params: int | None = None
    latency_predicted_ms: float | None = None  # the latency table's prediction (when a budget names latency)
    latency_ms: float | None = None  # timed in the trial, as the table was (its device, batch, threads)
    within_budget: bool | None = None  # False: timed over the latency budget by more than the table's error
    score: float | None = None  # what the search maximises (held-out accuracy, or minus the loss)
    accuracy: float | None = None  # held-out accuracy after adaptive BN (classification)
    metrics: dict[str, float] | None = None  # the task's held-out figures after adaptive BN, its metric first
    loss: float | None = None
    bn_recalibrated: bool | None = None
    calibration_batches: int | None = None  # batches adaptive BN used (fewer than configured: it converged)
    warning: str | None = None
    t_prune: float | None = None
    t_calibrate: float | None = None
    t_score: float | None = None
    device: str | None = None
    node: str | None = None  # the Ray node that evaluated it
    trial_id: str | None = None
    finished_at: float | None = None

    @classmethod
    def failed(cls, index: int, ratios, error: str) -> "CandidateRecord":
        """The record of a candidate whose evaluation failed (the error's first line, shortened)."""
        line = error.strip().splitlines()[0] if error.strip() else "failed"
        return cls(index, [float(r) for r in ratios or []], status="failed", error=line[:500])

    @classmethod
    def from_dict(cls, d: dict) -> "CandidateRecord":
        """A record from a dict that holds its fields (a Tune result, a Parquet row); other keys are ignored."""
        found = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if isinstance(found.get("metrics"), list):  # a Parquet map reads back as (key, value) pairs
            found["metrics"] = dict(found["metrics"])
        return cls(**found)

    def to_dict(self) -> dict:
        """The record as a plain dict (Tune's result, a Parquet row, a leaderboard entry)."""
        return dataclasses.asdict(self)

    @property
    def ok(self) -> bool:
        """True if the candidate was evaluated and scored."""
        return self.status == "ok" and self.score is not None


def rank_key(record: CandidateRecord) -> tuple:
    """Sort key for scored candidates: best score first, then lower FLOPs, then index (a total order)."""
    if record.score is None:
        raise ValueError(f"candidate {record.index} has no score to rank by")
    return (-record.score, record.flops or 0, record.index)


def best(records: list[CandidateRecord], k: int) -> list[CandidateRecord]:
    """The k best successful candidates within budget, best first."""
    return sorted((r for r in records if r.ok and r.within_budget is not False), key=rank_key)[:k]


def best_networks(records: list[CandidateRecord], k: int) -> list[CandidateRecord]:
    """The k best successful candidates within budget that prune to different networks, best first: a strategy that
    keeps the same units per group as a better one (ratios that round alike) is the same network, left out."""
    chosen: list[CandidateRecord] = []
    seen: set = set()
    for r in best(records, len(records)):
        if len(chosen) == k:
            break
        network = tuple(r.kept_units) if r.kept_units is not None else r.index
        if network not in seen:
            seen.add(network)
            chosen.append(r)
    return chosen
