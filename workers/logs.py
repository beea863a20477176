"""prunetune's output: every line it says goes through the `prunetune` logger, whose console handler prints it as
the command line always has: what a run's stages say (`RUN`) on stdout, the rest (`PREPARE`, warnings) on stderr.

From Python, `logging.getLogger("prunetune").setLevel(logging.ERROR)` silences it; to send the lines elsewhere,
replace the handler (`logging.getLogger("prunetune").handlers[:] = [your_handler]`). The logger does not propagate
to the root logger, so a program's own logging set-up never prints a line twice.
"""
from __future__ import annotations

import io
import logging
import sys

ROOT = logging.getLogger("prunetune")
RUN = logging.getLogger("prunetune.run")  # the search and fine-tuning stages, Ray's start (stdout)
PREPARE = logging.getLogger("prunetune.prepare")  # checks, data, base model, training progress, warnings (stderr)


class Console(logging.Handler):
    """Writes each record's message as one line to the process's stdout (a stage line) or stderr (the rest), the
    streams as they are at that moment (a test's or a notebook's capture sees them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            staged = record.name.startswith(RUN.name) and record.levelno < logging.WARNING
            stream = sys.stdout if staged else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


CONSOLE = Console()
if not ROOT.handlers:
    ROOT.addHandler(CONSOLE)
if ROOT.level == logging.NOTSET:
    ROOT.setLevel(logging.INFO)
ROOT.propagate = False


class LineStream(io.TextIOBase):
    """A text stream for code that prints lines (and, on a terminal, a progress bar redrawn in place): each complete
    line becomes an INFO record of `logger`; the bar is drawn only while the console handler alone prints those
    records, to a terminal."""

    def __init__(self, logger: logging.Logger = PREPARE):
        super().__init__()
        self.logger, self.pending = logger, ""

    def isatty(self) -> bool:
        """True when a redrawn bar would reach a terminal through the console handler."""
        return self.logger.isEnabledFor(logging.INFO) and ROOT.handlers == [CONSOLE] and sys.stderr.isatty()

    def write(self, text: str) -> int:
        if text.startswith("\r"):  # a bar's redraw: not a line
            if self.isatty():
                sys.stderr.write(text)
            return len(text)
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self.logger.info(line)
        return len(text)

    def flush(self) -> None:
        if self.isatty():
            sys.stderr.flush()


def warn(message: str) -> None:
    """A warning line on stderr: `prunetune: warning: MESSAGE`."""
    PREPARE.warning(f"prunetune: warning: {message}")
