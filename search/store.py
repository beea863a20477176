"""Results store: one row per finished candidate in OUTPUT/candidates.parquet (a directory of part files).

Each write is a new part file written to a temporary name and renamed, so a kill never leaves a torn file;
readers skip a damaged part (and say so) and keep the first row of each candidate index, so a candidate
appears exactly once however often the driver was interrupted. `compact()` folds the parts into one.
"""
from __future__ import annotations

import glob
import hashlib
import os
import uuid
import warnings

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("index", pa.int64()),  # seed index of the strategy: candidate i of the sampler's seed
    ("trial_id", pa.string()),
    ("status", pa.string()),  # ok | failed
    ("error", pa.string()),
    ("ratios", pa.list_(pa.float64())),
    ("kept_channels", pa.list_(pa.int64())),
    ("flops", pa.int64()),
    ("flops_ratio", pa.float64()),
    ("params", pa.int64()),
    ("score", pa.float64()),
    ("accuracy", pa.float64()),
    ("loss", pa.float64()),
    ("bn_recalibrated", pa.bool_()),
    ("warning", pa.string()),
    ("t_prune", pa.float64()),
    ("t_calibrate", pa.float64()),
    ("t_score", pa.float64()),
    ("device", pa.string()),
    ("node", pa.string()),
    ("finished_at", pa.float64()),
])


def store_dir(output_dir: str) -> str:
    """Where the candidates dataset lives inside a run's output directory."""
    return os.path.join(output_dir, "candidates.parquet")


def _row(record: dict) -> dict:
    return {name: record.get(name) for name in SCHEMA.names}


def sha256(path: str) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CandidateStore:
    """Append-only Parquet store of candidate results, deduplicated by candidate index."""

    def __init__(self, output_dir: str):
        self.path = store_dir(output_dir)
        os.makedirs(self.path, exist_ok=True)
        self._known: set[int] | None = None

    def parts(self) -> list[str]:
        """Part files in write order."""
        return sorted(glob.glob(os.path.join(self.path, "part-*.parquet")))

    def append(self, records: list[dict]) -> str | None:
        """Write records not already stored as one new part file (atomic); return its path."""
        known = self.indices()
        fresh = [r for r in records if r["index"] not in known]
        if not fresh:
            return None
        table = pa.Table.from_pylist([_row(r) for r in fresh], schema=SCHEMA)
        name = f"part-{len(self.parts()):06d}-{uuid.uuid4().hex[:8]}.parquet"
        final = os.path.join(self.path, name)
        tmp = os.path.join(self.path, f".{name}.tmp")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        known.update(r["index"] for r in fresh)
        return final

    def read(self, report=None) -> pa.Table:
        """All intact rows, first row per candidate index kept; damaged parts are skipped and reported."""
        tables = []
        for part in self.parts():
            try:
                tables.append(pq.read_table(part, schema=SCHEMA))
            except Exception as e:  # torn or foreign file: skip it, never crash a report
                message = f"skipped damaged part {os.path.basename(part)}: {str(e).splitlines()[0]}"
                (report or (lambda m: warnings.warn(m, stacklevel=2)))(message)
        if not tables:
            return SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        seen, keep = set(), []
        for i, index in enumerate(table.column("index").to_pylist()):
            if index not in seen:
                seen.add(index)
                keep.append(i)
        return table.take(keep)

    def indices(self) -> set[int]:
        """Candidate indices already stored."""
        if self._known is None:
            self._known = set(self.read(report=lambda m: None).column("index").to_pylist())
        return self._known

    def rows(self) -> list[dict]:
        """All stored rows as dicts, in index order."""
        return sorted(self.read().to_pylist(), key=lambda r: r["index"])

    def compact(self) -> None:
        """Fold all parts into one file (written before the old parts are removed)."""
        parts = self.parts()
        if len(parts) <= 1:
            return
        table = self.read().sort_by("index")
        name = f"part-{0:06d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = os.path.join(self.path, f".{name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, os.path.join(self.path, name))
        for part in parts:
            os.remove(part)

    def manifest(self) -> dict:
        """Row count and per-part checksums, for the run manifest."""
        return {"rows": len(self.indices()),
                "parts": {os.path.basename(p): sha256(p) for p in self.parts()}}

    def verify(self, manifest: dict) -> list[str]:
        """Problems found comparing the parts on disk with a manifest written earlier."""
        problems = []
        for name, digest in manifest.get("parts", {}).items():
            path = os.path.join(self.path, name)
            if not os.path.isfile(path):
                problems.append(f"{name}: listed in the manifest but missing")
            elif sha256(path) != digest:
                problems.append(f"{name}: checksum differs from the manifest")
        return problems
