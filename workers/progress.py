"""Progress lines for long loops that would otherwise say nothing (decoding a folder, an epoch outside a terminal):
`WHAT: k/total (x/s, ETA m:ss)` at most every PROGRESS_EVERY_S seconds, and one closing line when the work took
longer than that."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .logs import CONSOLE, PREPARE

# At most one progress line this often; PRUNETUNE_PROGRESS_EVERY_S sets it (the test suite sets it high, so that no
# line depends on how fast the machine is; tests of the lines patch it: 0 prints every step).
PROGRESS_EVERY_S = float(os.environ.get("PRUNETUNE_PROGRESS_EVERY_S", "5"))


def duration(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def due(last: float, now: float, every_s: float | None = None) -> bool:
    """Whether a progress line is due at `now`, the last one (or the start) having been at `last`."""
    return now - last >= (PROGRESS_EVERY_S if every_s is None else every_s)


@dataclass
class Progress:
    """Counts `total` items of work named `what`, saying how far it is on `logger`."""

    what: str
    total: int
    logger: logging.Logger = PREPARE
    every_s: float = field(default_factory=lambda: PROGRESS_EVERY_S)  # by default as it is when the work starts
    clock: Callable[[], float] = time.monotonic
    done_n: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.start = self.shown = self.clock()

    def advance(self, n: int = 1) -> None:
        """`n` more items done; a line if one is due."""
        self.done_n += n
        now = self.clock()
        if due(self.shown, now, self.every_s) and self.done_n < self.total:
            self.shown = now
            rate = self.done_n / max(now - self.start, 1e-9)
            self.logger.info(f"{self.what}: {self.done_n}/{self.total} ({rate:.0f}/s, "
                             f"ETA {duration((self.total - self.done_n) / rate)})")

    def done(self) -> None:
        """The closing line, when the work took longer than `every_s`."""
        took = self.clock() - self.start
        if took > self.every_s:
            self.logger.info(f"{self.what}: {self.done_n}/{self.total} done in {duration(took)} "
                             f"({self.done_n / took:.0f}/s)")


@dataclass
class Steps:
    """Names each step of a long piece of work `what` as it starts (`WHAT: STEP (m:ss so far)`), once a line is due,
    and its end: a piece of work done in under `every_s` says nothing."""

    what: str
    logger: logging.Logger = PREPARE
    every_s: float | None = None  # None: PROGRESS_EVERY_S as it is at each step
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.start = self.shown = self.clock()

    def step(self, name: str) -> None:
        """Step `name` starts; a line if one is due."""
        now = self.clock()
        if due(self.shown, now, self.every_s):
            self.shown = now
            self.logger.info(f"{self.what}: {name} ({duration(now - self.start)} so far)")

    def done(self) -> None:
        """The closing line, when the work took longer than `every_s`."""
        took = self.clock() - self.start
        if took > (PROGRESS_EVERY_S if self.every_s is None else self.every_s):
            self.logger.info(f"{self.what}: done in {duration(took)}")


@contextlib.contextmanager
def _every(seconds: float, tick: Callable[[], None]):
    """While the block runs, `tick()` every `seconds` from a background thread (stopped and joined after it)."""
    finished = threading.Event()

    def run() -> None:
        while not finished.wait(seconds):
            tick()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join()


@contextlib.contextmanager
def waiting(what: str, logger: logging.Logger = PREPARE, every_s: float | None = None):
    """While the block runs (one call that says nothing, e.g. ray.init), `WHAT (m:ss)` every `every_s` seconds from
    a background thread, so that a slow start is not silent."""
    start = time.monotonic()
    with _every(PROGRESS_EVERY_S if every_s is None else every_s,
                lambda: logger.info(f"{what} ({duration(time.monotonic() - start)})")):
        yield


class _LastLine(logging.Filter):
    """Remembers when the console last printed a line of the prunetune logger, and which line (and when) other than
    never_silent's own (a filter that keeps all)."""

    def __init__(self) -> None:
        super().__init__()
        self.at = self.text_at = time.monotonic()
        self.text = ""

    def filter(self, record: logging.LogRecord) -> bool:
        self.at = time.monotonic()
        if not getattr(record, "still_working", False):
            self.text, self.text_at = record.getMessage(), self.at
        return True


@contextlib.contextmanager
def never_silent(every_s: float | None = None):
    """While the block runs (a whole command), whenever the console has printed nothing for `every_s` seconds (by
    default 1.5 x PROGRESS_EVERY_S, so that progress lines that come on time are not doubled),
    `prunetune: still working (m:ss since: LAST LINE)` on stderr: no step of a run is silent for long."""
    interval = 1.5 * PROGRESS_EVERY_S if every_s is None else every_s
    last = _LastLine()

    def check() -> None:
        now = time.monotonic()
        if now - last.at >= interval:
            since = f"since: {last.text[:80]}" if last.text else "since the start"
            PREPARE.info(f"prunetune: still working ({duration(now - last.text_at)} {since})",
                         extra={"still_working": True})

    CONSOLE.addFilter(last)
    try:
        with _every(max(0.05, min(interval, 1.0)), check):
            yield
    finally:
        CONSOLE.removeFilter(last)
