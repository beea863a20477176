"""Progress lines: at most every every_s, with the rate and the time left, a closing line for long work only; the
steps of a long piece of work named once a line is due."""
from prunetune.workers.progress import Progress, Steps, duration


class _Lines(list):
    def info(self, line: str) -> None:
        self.append(line)


def test_progress_says_how_far_at_most_every_every_s_with_its_rate_eta_and_a_closing_line():
    now, lines = [0.0], _Lines()
    progress = Progress("data: decoding images", 100, lines, every_s=10, clock=lambda: now[0])
    for t, n in ((4, 10), (11, 10), (15, 10), (22, 10), (55, 60)):
        now[0] = t
        progress.advance(n)
    progress.done()
    assert lines == ["data: decoding images: 20/100 (2/s, ETA 0:44)", "data: decoding images: 40/100 (2/s, ETA 0:33)",
                     "data: decoding images: 100/100 done in 0:55 (2/s)"]


def test_work_shorter_than_every_s_says_nothing():
    now, lines = [0.0], _Lines()
    progress = Progress("data: hashing image files", 5, lines, every_s=10, clock=lambda: now[0])
    for t in (1, 3, 9, 9.5, 10):
        now[0] = t
        progress.advance()
    progress.done()
    assert lines == []


def test_steps_are_named_once_a_line_is_due_with_the_time_so_far_and_long_work_says_its_end():
    now, lines = [0.0], _Lines()
    steps = Steps("preflight", lines, every_s=10, clock=lambda: now[0])
    for t, name in ((2, "tracing"), (12, "proving a"), (15, "proving b"), (90, "proving c")):
        now[0] = t
        steps.step(name)
    now[0] = 95
    steps.done()
    assert lines == ["preflight: proving a (0:12 so far)", "preflight: proving c (1:30 so far)",
                     "preflight: done in 1:35"]
    quick = Steps("preflight", lines, every_s=10, clock=lambda: now[0])
    quick.step("tracing")
    quick.done()
    assert len(lines) == 3


def test_durations_read_as_minutes_or_hours():
    assert [duration(s) for s in (0, 59.6, 83, 3600 + 62)] == ["0:00", "1:00", "1:23", "1:01:02"]


def test_a_silent_call_is_not_silent_while_it_waits(monkeypatch):
    import logging
    import time

    from prunetune.workers import progress

    lines = []

    class Lines(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("prunetune.test.waiting")
    logger.addHandler(Lines())
    logger.setLevel(logging.INFO)
    with progress.waiting("[ray] still starting", logger, every_s=0.05):
        deadline = time.monotonic() + 60
        while len(lines) < 2 and time.monotonic() < deadline:  # however busy the machine, two lines come
            time.sleep(0.01)
    count = len(lines)
    time.sleep(0.2)
    assert count >= 2 and all(line.startswith("[ray] still starting (0:0") for line in lines)
    assert len(lines) == count  # none after the block


def test_a_command_is_never_silent_for_longer_than_the_interval(capsys):
    import time

    from prunetune.workers import progress
    from prunetune.workers.logs import RUN

    err = ""
    with progress.never_silent(every_s=0.05):
        RUN.info("[search] a line")
        deadline = time.monotonic() + 60
        while err.count("still working") < 2 and time.monotonic() < deadline:  # however busy
            err += capsys.readouterr().err
            time.sleep(0.01)
    assert time.monotonic() < deadline
    # each names the last line of the run, not the one before it (they never nest)
    assert all(line.startswith("prunetune: still working (0:0") and line.endswith(" since: [search] a line)")
               for line in err.splitlines()), err
    time.sleep(0.2)
    assert "still working" not in capsys.readouterr().err  # the watch ends with the block
    with progress.never_silent(every_s=3600):  # lines keep coming: nothing is added
        RUN.info("[search] another line")
    assert capsys.readouterr() == ("[search] another line\n", "")
