"""Results store: one row per finished candidate in OUTPUT/candidates.parquet (a directory of part files).

Each write is a new part file (a group of records: the search commits them in groups, see
`tune_search.StoreCallback`) written to a temporary name and renamed, so a kill never leaves a torn file;
readers skip a damaged part (and say so) and keep the first row of each candidate index, so a candidate
appears exactly once however often the driver was interrupted. `compact()` folds the parts into one.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re
import uuid
import warnings

import pyarrow as pa
import pyarrow.parquet as pq

from prunetune.workers.files import atomic_write
from prunetune.workers.record import CandidateRecord

from .runfiles import StoredParts

_ARROW = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_(),
          "list[float]": pa.list_(pa.float64()), "list[int]": pa.list_(pa.int64()),
          "dict[str, float]": pa.map_(pa.string(), pa.float64())}
PART_NAME = re.compile(r"part-(\d{6,})-[0-9a-f]{8}\.parquet")  # a part file's name: its number, a tag
SCHEMA = pa.schema([(f.name, _ARROW[str(f.type).replace(" | None", "")]) for f in dataclasses.fields(CandidateRecord)])


def store_dir(output_dir: str) -> str:
    """Where the candidates dataset lives inside a run's output directory."""
    return os.path.join(output_dir, "candidates.parquet")


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
        self.path = store_dir(output_dir)  # created by the first append: reading a run never writes
        self._known: set[int] | None = None
        self._next_part: int | None = None  # number of the next part file, counted once from the disk

    def parts(self) -> list[str]:
        """Part files in write order."""
        return sorted(glob.glob(os.path.join(self.path, "part-*.parquet")))

    def append(self, records: list[CandidateRecord]) -> str | None:
        """Write records not already stored as one new part file (atomic, durable); return its path."""
        written = self.write_part(records)
        return written[0] if written else None

    def write_part(self, records: list[CandidateRecord]) -> tuple[str, str, int] | None:
        """Write the records whose index is not stored yet (the first of each index, if one repeats) as one new
        part file, atomically and durably (one fsync); return (path, its SHA-256, rows written), or None if
        nothing was new. The checksum is of the bytes written, so no part is read back, and the cost does not
        grow with the parts already stored (the stored indices are read once, then kept)."""
        known = self.indices()
        fresh, seen = [], set()
        for r in records:
            if r.index not in known and r.index not in seen:
                seen.add(r.index)
                fresh.append(r)
        if not fresh:
            return None
        table = pa.Table.from_pylist([r.to_dict() for r in fresh], schema=SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        if self._next_part is None:
            numbers = [int(m.group(1)) for p in self.parts() if (m := PART_NAME.fullmatch(os.path.basename(p)))]
            self._next_part = max(numbers, default=-1) + 1
        path = os.path.join(self.path, f"part-{self._next_part:06d}-{uuid.uuid4().hex[:8]}.parquet")

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        atomic_write(path, write, durable=True)
        self._next_part += 1
        known.update(seen)
        return path, hashlib.sha256(data).hexdigest(), len(fresh)

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

    def records(self, report=None) -> list[CandidateRecord]:
        """All stored candidates, in index order (damaged parts skipped and reported, as by read())."""
        rows = self.read(report).to_pylist()
        return sorted((CandidateRecord.from_dict(row) for row in rows), key=lambda r: r.index)

    def compact(self) -> None:
        """Fold all parts into one file (written before the old parts are removed)."""
        parts = self.parts()
        if len(parts) <= 1:
            return
        table = self.read().sort_by("index")
        path = os.path.join(self.path, f"part-{0:06d}-{uuid.uuid4().hex[:8]}.parquet")
        atomic_write(path, lambda tmp: pq.write_table(table, tmp), durable=True)
        for part in parts:
            os.remove(part)
        self._next_part = None

    def manifest(self) -> StoredParts:
        """Row count and per-part checksums, for the run manifest."""
        return StoredParts(rows=len(self.indices()), parts={os.path.basename(p): sha256(p) for p in self.parts()})

    def verify(self, stored: StoredParts | None) -> list[str]:
        """Problems found comparing the parts on disk with what a manifest recorded earlier (None: nothing)."""
        problems = []
        for name, digest in (stored.parts if stored else {}).items():
            path = os.path.join(self.path, name)
            if not os.path.isfile(path):
                problems.append(f"{name}: listed in the manifest but missing")
            elif sha256(path) != digest:
                problems.append(f"{name}: checksum differs from the manifest")
        return problems
