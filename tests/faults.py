"""Faults injected from the tests (the shipped code has none): Ray runs `install` in every worker process.

`ray.init(runtime_env=worker_faults(...))` makes each worker wrap the evaluator and the fine-tuning loop:
log every evaluation started, slow them down, make candidate k (or every one: `all`) raise, make candidate k kill its
worker process with SIGKILL (once, or `crashes` times), or make candidate k, or the end of fine-tuning epoch n, stop
its worker process with SIGSTOP (a hung worker; once). `python -m tests.faults DRIVER_PAUSE_S ARGS...` runs the
`prunetune` command with such a Ray (configured by PRUNETUNE_TEST_* variables) and, optionally, a pause between the two
stages of the run; with PRUNETUNE_TEST_DISK_FULL=FILE, the driver's disk is full while FILE exists; with
PRUNETUNE_TEST_KILL_AT_COMMIT=N, the driver kills itself just before its N-th group commit of search results.
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # workers import tests.faults from here
LOG, DELAY, FAIL_AT, CRASH_AT, CRASHES, MARKERS, HANG_AT, HANG_EPOCH, DISK_FULL, KILL_AT_COMMIT = (
    f"PRUNETUNE_TEST_{k}" for k in ("LOG", "DELAY_S", "FAIL_AT", "CRASH_AT", "CRASHES", "MARKERS", "HANG_AT",
                                    "HANG_EPOCH", "DISK_FULL", "KILL_AT_COMMIT"))
UNCOMMITTED = "uncommitted.json"  # in the MARKERS folder: what the driver had received when kill_at_commit killed it


def sigint_as_in_a_terminal() -> None:
    """`preexec_fn` of a child process a test interrupts with SIGINT, as Ctrl-C does. A non-interactive shell starts
    a background job (`nohup pytest &`) with SIGINT ignored, every child inherits that, and Python then installs no
    KeyboardInterrupt handler: the interrupt would be lost. Reset before exec, Python installs its handler as it
    does when started from a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def worker_faults(log=None, delay_s=None, fail_at=None, crash_at=None, crashes=None, markers=None, hang_at=None,
                  hang_epoch=None) -> dict:
    """A Ray runtime_env whose workers misbehave as asked (every argument optional; hangs need `markers`)."""
    env = {LOG: log, DELAY: delay_s, FAIL_AT: fail_at, CRASH_AT: crash_at, CRASHES: crashes, MARKERS: markers,
           HANG_AT: hang_at, HANG_EPOCH: hang_epoch, "PYTHONPATH": ROOT}
    return {"env_vars": {k: str(v) for k, v in env.items() if v is not None},
            "worker_process_setup_hook": "tests.faults.install"}


def _delay() -> None:
    time.sleep(float(os.environ.get(DELAY, "0")))


def _hang(marker: str) -> None:
    """Stop this worker process with SIGSTOP (it hangs until killed), unless the marker file (in the MARKERS folder,
    created exclusively) says a process already hung here."""
    try:
        fd = os.open(os.path.join(os.environ[MARKERS], marker), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())  # for end_hung_workers
    os.close(fd)
    os.kill(os.getpid(), signal.SIGSTOP)


def end_hung_workers(markers: str) -> None:
    """SIGKILL every worker a hang fault stopped (their pids are in the markers): a stopped process outlives the
    Ray that started it when nothing kills it."""
    for name in os.listdir(markers):
        text = open(os.path.join(markers, name)).read().strip() if name.startswith("hung-") else ""
        if text.isdigit() and int(text) > 1:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(text), signal.SIGKILL)


@contextlib.contextmanager
def embedded_ray(**faults):
    """An embedded Ray for this process whose workers misbehave as `worker_faults(**faults)` asks."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env=worker_faults(**faults))
    try:
        yield
    finally:
        ray.shutdown()


def install() -> None:
    """Wrap CandidateEvaluator.evaluate and the trials' finetune in this worker process."""
    from prunetune.search import trials
    from prunetune.workers.evaluator import CandidateEvaluator

    evaluate, finetune = CandidateEvaluator.evaluate, trials.finetune

    def faulty_evaluate(self, ratios, index=0):
        if os.environ.get(LOG):
            with open(os.environ[LOG], "a") as f:
                f.write(f"{index}\n")
        _delay()
        if os.environ.get(HANG_AT) == str(index):
            _hang(f"hung-{index}")
        if os.environ.get(FAIL_AT) in (str(index), "all"):
            raise RuntimeError("injected failure")
        if os.environ.get(CRASH_AT) == str(index):  # one marker per crash: crashed-K, crashed-K-2, ...
            folder, crashes = os.environ.get(MARKERS, ""), int(os.environ.get(CRASHES, "1"))
            markers = [os.path.join(folder, f"crashed-{index}" + (f"-{n}" if n > 1 else ""))
                       for n in range(1, crashes + 1)]
            fresh = [m for m in markers if not os.path.exists(m)]
            if fresh:
                open(fresh[0], "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return evaluate(self, ratios, index)

    def slow_finetune(model, data, settings, options):
        def epoch_done(epoch, *a):
            _delay()
            if os.environ.get(HANG_EPOCH) == str(epoch + 1):  # before the epoch is reported
                _hang(f"hung-epoch-{epoch + 1}")
            options.on_epoch(epoch, *a)

        return finetune(model, data, settings, dataclasses.replace(options, on_epoch=epoch_done))

    CandidateEvaluator.evaluate = faulty_evaluate
    trials.finetune = slow_finetune


class _FullFile:
    """A file on a full disk: a write puts part of its data down, then fails with ENOSPC, as the OS does."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(data[:len(data) // 2])
        self._file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def fill_the_disk_while(marker: str) -> None:
    """In this process, every file opened for writing while `marker` exists is on a full disk (its writes fail
    with ENOSPC after writing part of their data)."""
    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and os.path.exists(marker):
            return _FullFile(f)
        return f

    builtins.open = open_on_a_full_disk


def kill_at_commit(n: int, markers: str) -> None:
    """In this driver, the search ledger's n-th group commit never happens: the indices of the records it would
    commit go to MARKERS/uncommitted.json, then the driver's process group (its Ray with it) is killed with SIGKILL."""
    import json

    from prunetune.search.ledger import Ledger

    commit, commits = Ledger._commit, []

    def killed_before(self, now):
        commits.append(now)
        if len(commits) == n:
            with open(os.path.join(markers, UNCOMMITTED), "w") as f:
                json.dump([r.index for r in self.pending], f)
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return commit(self, now)

    Ledger._commit = killed_before


def main(argv: list[str]) -> int:
    """Start Ray with the worker faults of the environment, optionally pause between stages, run the command."""
    import logging

    import ray

    from prunetune.search import driver
    from prunetune.search.cli import main as prunetune

    pause = float(argv[0])
    run_finetune = driver.run_finetune

    def paused(*args, **kwargs):
        time.sleep(pause)
        return run_finetune(*args, **kwargs)

    driver.run_finetune = paused
    if os.environ.get(DISK_FULL):
        fill_the_disk_while(os.environ.pop(DISK_FULL))
    if os.environ.get(KILL_AT_COMMIT):
        kill_at_commit(int(os.environ.pop(KILL_AT_COMMIT)), os.environ[MARKERS])
    faults = {k[len("PRUNETUNE_TEST_"):].lower(): v for k, v in os.environ.items() if k.startswith("PRUNETUNE_TEST_")}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             runtime_env=worker_faults(**faults))  # as prunetune's own embedded Ray
    return prunetune(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
