"""The `prunetune` command line."""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading

from prunetune.workers.errors import BadInput, PrunetuneError, RunFailed
from prunetune.workers.progress import never_silent

from .config import ConfigError, load_config, resumable_keys

class Interrupted(PrunetuneError):
    """Ctrl-C (or SIGTERM, SIGHUP) stopped a run where it was; the message says what is kept and how to continue;
    the exit status is the signal's (130 for Ctrl-C)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # what kill, timeout, systemd, Kubernetes, Slurm, `ray job stop` and
# a closed terminal send: they stop a command as Ctrl-C does
_received: list[int] = []  # the stop signals received while the command runs


def _stop(signum, frame):
    """Handler of the stop signals: a KeyboardInterrupt, as Ctrl-C raises, so every stage stops the same way. The
    signal is remembered apart: Ray's core turns a KeyboardInterrupt raised during its calls into a new one."""
    _received.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _stopping_like_ctrl_c():
    """SIGTERM and SIGHUP raise KeyboardInterrupt while the command runs (the handlers before it are put back
    after); `cluster.connect` keeps them across ray.init, which installs its own."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():  # main() called from a thread: signals stay
        yield
        return
    before = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _interrupt() -> tuple[str, int]:
    """How the interrupt is named and the exit status it gives: 130 for Ctrl-C, 128 + the signal otherwise."""
    if _received:
        return f"interrupted by {signal.Signals(_received[0]).name}", 128 + _received[0]
    return "interrupted", 128 + signal.SIGINT


def _launch(run, fn):
    """Run `fn`, turning Ctrl-C, SIGTERM and SIGHUP into Interrupted, and a full disk into DiskFull: a run that has
    started stays resumable, never marked done."""
    try:
        return fn()
    except KeyboardInterrupt:
        how, code = _interrupt()
        if run.exists():
            raise Interrupted(f"{how}; the run is kept as it was: continue it with `prunetune resume {run.path}`",
                              code) from None
        raise Interrupted(f"{how} before the run started; nothing was written", code) from None
    except Exception as e:
        from .rundir import no_space

        full = no_space(e)
        if full is None:
            raise
        raise DiskFull(_disk_full_message(full, run)) from None


class DiskFull(RunFailed, RuntimeError):
    """A write of the run found its file system full; the message names it and how to continue."""


def _disk_full_message(error: OSError, run) -> str:
    """`output.dir: no space left on MOUNT (N MB free); free space and ...` (a file elsewhere is named instead)."""
    import shutil

    target = os.path.abspath(error.filename) if isinstance(error.filename, str) else run.path
    inside = target == run.path or target.startswith(run.path + os.sep)
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    mount = existing
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    free_mb = shutil.disk_usage(existing).free / 2 ** 20
    then = f"continue with `prunetune resume {run.path}`" if run.exists() else "run it again"
    return (f"{'output.dir' if inside else target}: no space left on {mount} ({free_mb:.0f} MB free); "
            f"free space and {then}")


def _config(path: str | None, overrides: list[str]):
    """The config, with a warning line for each setting that is probably not what the user meant."""
    from .config import config_warnings
    from .prepare import warn

    cfg = load_config(path, overrides)
    for message in config_warnings(cfg):
        warn(message)
    return cfg


def _cmd_run(args) -> int:
    from .cluster import check_address
    from .driver import launch
    from .prepare import prepare
    from .rundir import RunDir

    cfg = _config(args.config, args.set)
    run = RunDir(cfg.output.dir)
    run.check_new(cfg, args.overwrite)
    check_address(args.address or cfg.ray.address)  # seconds, before the base model is trained
    with never_silent():
        summary = _launch(run, lambda: launch(prepare(cfg), run, args.address, restore=False,
                                              overwrite=args.overwrite))
    _print_done(run, summary)
    return 0


def _cmd_resume(args) -> int:
    from .cluster import check_address
    from .config import resumable
    from .driver import launch
    from .prepare import prepare, warn
    from .rundir import RunDir, config_hash
    from .runfiles import MANIFEST
    from .store import CandidateStore

    run = RunDir(args.output)
    if not run.exists():
        raise ConfigError(f"output: {run.path} holds no prunetune run to resume (no {MANIFEST})")
    manifest = run.manifest()
    run.check_free()
    for override in args.set:
        key = override.partition("=")[0].strip()
        if not resumable(key):
            allowed = resumable_keys()
            raise ConfigError(f"--set {key}: a resumed run keeps its config; only {allowed} may change")
    cfg = _config(run.config_path, args.set)
    if args.config and config_hash(load_config(args.config)) != config_hash(cfg):
        raise ConfigError(f"--config: {args.config} does not match the run in {run.path}; "
                          "resume it without --config, or start a new run")
    check_address(args.address or cfg.ray.address)
    lost = CandidateStore(run.path).verify(manifest.candidates)
    for problem in lost:
        warn(f"{problem}; its candidates are evaluated again (and the finalists chosen anew)")
    if manifest.stage == "done" and not lost:
        print(f"{run.path}: the run is already complete")
        return 0
    print(f"resuming {run.path} at stage '{'search' if lost else manifest.stage}'", flush=True)
    with never_silent():
        summary = _launch(run, lambda: launch(prepare(cfg), run, args.address, restore=True))
    _print_done(run, summary)
    return 0


def _cmd_finetune(args) -> int:
    from .cluster import check_address
    from .config import resumable
    from .driver import launch
    from .prepare import prepare
    from .refinetune import candidate_path, refinetune, stored_candidate

    run = _run_dir(args.output)
    run.check_free()
    for override in args.set:
        key = override.partition("=")[0].strip()
        if not (key.startswith("finetune.") or resumable(key)):
            allowed = resumable_keys("finetune")
            raise ConfigError(f"--set {key}: a candidate is fine-tuned again as the run found it; only {allowed} "
                              "may change")
    cfg = _config(run.config_path, args.set)
    record = stored_candidate(run, args.candidate)
    candidate_path(run, args.candidate, cfg)  # refused before Ray starts if it is there already
    check_address(args.address or cfg.ray.address)
    figures = _launch(run, lambda: launch(prepare(cfg), run, args.address, restore=True,
                                          body=lambda prep, run, restore: refinetune(prep, run, record)))
    print(f"\ncandidate {args.candidate} fine-tuned for {figures.epochs} epochs: test {figures.metric} "
          f"{100 * figures.test:.2f}% (val {100 * figures.val:.2f}%): {figures.path}")
    return 0


def _print_done(run, summary) -> None:
    from .report import finals_lines, front_lines, kept, over_budget

    best, base, metric = summary.final[0], summary.base, summary.metric
    latency = ""
    if best.latency_ms_budget_batch and base.latency_ms_budget_batch and best.latency_predicted_ms \
            and base.latency_predicted_ms:
        latency = (f", {100 * best.latency_ms_budget_batch / base.latency_ms_budget_batch:.1f}% of its latency at "
                   f"batch {summary.latency.batch_size} (predicted "
                   f"{100 * best.latency_predicted_ms / base.latency_predicted_ms:.1f}%)")
    print(f"\nbest model: {best.path} (candidate {best.candidate}, {kept(best)}): test {metric} "
          f"{100 * best.test:.2f}% at {100 * best.flops_ratio:.1f}% of base FLOPs{latency} "
          f"(base {100 * base.test:.2f}%){over_budget(best)}")
    print("final models:\n" + "\n".join(finals_lines(summary)))
    if summary.front:
        print("front (held-out score before fine-tuning):\n" + "\n".join(front_lines(summary)))
    print(f"report: {os.path.join(run.path, 'report.md')}")
    out = shlex.quote(run.path)
    steps = [(f"prunetune report {out}", "the tables again, in the terminal"),
             (f"prunetune export {out} --rank 1 --format onnx", "the best model for deployment (or torchscript)"),
             (f"prunetune export {out} --test-split DIR", "the test images, to check a model yourself")]
    if summary.front:
        steps.insert(2, (f"prunetune export {out} --point K", "the model of the front's point K (or --budget X)"))
    width = max(len(command) for command, _ in steps)
    print("what next:\n" + "\n".join(f"  {command:<{width}}  # {why}" for command, why in steps))


_NATURAL_SHAPES = {"digits_cnn": (1, 8, 8), "mobilenet_v1_224": (3, 224, 224)}


def _input_shape(text: str | None, model: str) -> tuple[int, ...]:
    """--input-shape C,H,W (three positive integers), or the model's natural input size."""
    if text is None:
        return _NATURAL_SHAPES.get(model, (3, 224, 224) if ":" in model else (3, 32, 32))
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--input-shape: expected C,H,W (three positive integers, e.g. 3,224,224), got '{text}'")
    return tuple(int(p) for p in parts)


def _cmd_inspect(args) -> int:
    import torch

    from prunetune.workers.data import load_data
    from prunetune.workers.groups import SpaceError
    from prunetune.workers.models import build_model

    from .prepare import data_kwargs, prove_space

    if args.model:
        if args.num_classes < 2:
            raise ConfigError(f"--num-classes: {args.num_classes} is not allowed; a classifier has 2 classes or more")
        if args.round_to < 1:
            raise ConfigError(f"--round-to: {args.round_to} is not allowed; use 1 (no rounding) or more")
        cfg = _config(args.config, [*args.set, f"search.round_to={args.round_to}"])
        shape = _input_shape(args.input_shape, args.model)
        model = build_model(args.model, args.num_classes, shape[0], cfg.model.kwargs)
        example, num_classes = torch.zeros(1, *shape), args.num_classes
    else:
        cfg = _config(args.config, args.set)
        data = load_data(**data_kwargs(cfg))
        model = build_model(cfg.model.name, data.num_classes, data.input_shape[0], cfg.model.kwargs)
        example, num_classes = data.example_input(), data.num_classes
    try:
        verdict = prove_space(cfg, model, example, num_classes)
    except SpaceError as e:  # a budget no strategy meets: with --latency, the shares that explain it first
        space = getattr(e, "space", None)
        if args.latency and space is not None and space.latency is not None:
            print(space.latency.describe(space))
        raise
    print(verdict.space.describe())
    print(verdict.describe())
    if args.latency:
        from .prepare import attach_latency, where_time_goes

        attach_latency(cfg, model, verdict.space)
        print(verdict.space.latency.describe(verdict.space))
        print(where_time_goes(cfg, verdict.space))
    return 0


def _cmd_submit(args) -> int:
    from . import jobs

    job_id = jobs.submit(args.config, args.address, args.set, args.python, args.working_dir)
    print(job_id)
    address = f" --address {args.address}" if args.address else ""
    print(f"follow it with: prunetune status {job_id}{address}; prunetune logs {job_id}{address} --follow")
    return 0


def _run_dir(target: str):
    """The RunDir at `target`, or ConfigError if no prunetune run is there (a read-only check)."""
    from .rundir import RunDir

    run = RunDir(target)
    if not run.exists():
        raise ConfigError(f"output: {target} holds no prunetune run")
    return run


def _cmd_status(args) -> int:
    if os.path.exists(args.target) or os.sep in args.target:  # a run directory, not a job id
        from .report import print_report

        print(print_report(_run_dir(args.target).path).split("\n\n")[0])
        return 0
    from . import jobs

    print(jobs.status(args.target, args.address))
    return 0


def _cmd_logs(args) -> int:
    from . import jobs

    jobs.logs(args.job_id, args.address, args.follow)
    return 0


def _cmd_report(args) -> int:
    from .report import print_report

    print(print_report(_run_dir(args.output).path))
    return 0


def _front_rank(args) -> int:
    """The final model rank to export: --rank, or the rank of the front point --point or --budget names."""
    from .front import point_rank
    from .runfiles import read_summary

    if args.point is None and args.budget is None:
        return args.rank
    run = _run_dir(args.output)
    summary = read_summary(run.path)
    if summary is None:
        raise ConfigError(f"{'--point' if args.point is not None else '--budget'}: {run.final_path} has no summary "
                          "(has the run finished? see `prunetune report`)")
    return point_rank(summary, args.point, args.budget)


def _cmd_export(args) -> int:
    args.rank = _front_rank(args)
    if args.test_split:
        from .export import export_test_split

        print(export_test_split(_run_dir(args.output).path, args.test_split))
        return 0
    if args.quantize:
        from .quantize import figures_table, quantize_int8

        path, figures = quantize_int8(_run_dir(args.output).path, args.rank, args.to, args.max_accuracy_drop)
        print(figures_table(figures))
        return 0 if path else 1
    from .export import export

    path = export(args.output, args.rank, args.format, args.to)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    p = argparse.ArgumentParser(prog="prunetune",
                                description="Search the best way to prune a CNN (EagleEye on Ray Tune).")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, positional=True):
        if positional:
            sp.add_argument("config", nargs="?", help="YAML config (default: the built-in digits search)")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set search.target=0.4")

    r = sub.add_parser("run", help="run a search end to end (embedded Ray unless --address)")
    with_config(r)
    r.add_argument("--address", help="Ray cluster address (default: ray.address, else an embedded Ray)")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in output.dir")
    r.set_defaults(fn=_cmd_run)

    rs = sub.add_parser("resume", help="continue an interrupted run (search or fine-tuning stage)",
                        description="Continue an interrupted run, in the search or the fine-tuning stage. --set may "
                        "change only how the run is scheduled: "
                        + resumable_keys() + ".")
    rs.add_argument("output", help="the run's output directory")
    rs.add_argument("--config", help="check that this config matches the run's")
    rs.add_argument("--address")
    with_config(rs, positional=False)
    rs.set_defaults(fn=_cmd_resume)

    ft = sub.add_parser("finetune", help="fine-tune a stored candidate again (e.g. another recipe: --set "
                        "finetune.epochs=30) into the run's final/, beside what is there")
    ft.add_argument("output", help="the run's output directory")
    ft.add_argument("--candidate", type=int, required=True, help="the candidate's index (the report's table)")
    ft.add_argument("--address")
    with_config(ft, positional=False)
    ft.set_defaults(fn=_cmd_finetune)

    i = sub.add_parser("inspect", help="print the prunable channel groups and FLOPs of a model")
    with_config(i)
    i.add_argument("--model", help="model name or package.module:function (instead of a config)")
    i.add_argument("--input-shape", help="C,H,W of the input (default: the model's natural size)")
    i.add_argument("--num-classes", type=int, default=10)
    i.add_argument("--round-to", type=int, default=1)
    i.add_argument("--latency", action="store_true", help="build (or load from the cache) the latency table on "
                   "latency.device and show each group's share of the latency, then each layer's latency before and "
                   "after pruning at the target and the layers whose channel counts cost speed")
    i.set_defaults(fn=_cmd_inspect)

    s = sub.add_parser("submit", help="submit a search to a Ray cluster as a Ray Job")
    with_config(s)
    s.add_argument("--address", help="dashboard address, e.g. http://HEAD:8265 (default $RAY_ADDRESS)")
    s.add_argument("--python", default="python", help="interpreter on the cluster that has prunetune installed")
    s.add_argument("--working-dir", help="also ship this directory (e.g. your model code) with the job")
    s.set_defaults(fn=_cmd_submit)

    st = sub.add_parser("status", help="status of a submitted job, or of a run directory")
    st.add_argument("target", help="job id or output directory")
    st.add_argument("--address")
    st.set_defaults(fn=_cmd_status)

    lg = sub.add_parser("logs", help="logs of a submitted job")
    lg.add_argument("job_id")
    lg.add_argument("--address")
    lg.add_argument("--follow", action="store_true")
    lg.set_defaults(fn=_cmd_logs)

    rp = sub.add_parser("report", help="table of the top candidates and the final models of a run")
    rp.add_argument("output")
    rp.set_defaults(fn=_cmd_report)

    ex = sub.add_parser("export", help="export a final model as pt, torchscript, onnx or an "
                        "Ultralytics checkpoint, or int8 ONNX")
    ex.add_argument("output")
    which = ex.add_mutually_exclusive_group()
    which.add_argument("--rank", type=int, default=1)
    which.add_argument("--point", type=int, help="the model of point K (1, 2, ...) of the run's front (a run whose "
                       "search.target is a range or a list of budgets)")
    which.add_argument("--budget", type=float, help="the model of the front's point at budget X (e.g. 0.4)")
    ex.add_argument("--format", choices=("pt", "torchscript", "onnx", "ultralytics"), default="pt",
                    help="ultralytics: a model.task yolo run's detector as the checkpoint ultralytics.YOLO(path) loads")
    ex.add_argument("--to", help="destination file (default: next to the model)")
    ex.add_argument("--quantize", choices=("int8",), help="int8 ONNX through ONNX Runtime's static quantization, "
                    "calibrated on the run's calibration images; prints fp32 vs int8 (accuracy, size, latency)")
    ex.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                    help="with --quantize: do not write an int8 model that loses more test accuracy (default 1.0)")
    ex.add_argument("--test-split", metavar="DIR", help="instead: write the run's test images (raw pixel values, as "
                    "the models take them) into the new directory DIR as <class>/<n>.png, with labels.csv")
    ex.set_defaults(fn=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the prunetune command."""
    args = build_parser().parse_args(argv)
    try:
        with _stopping_like_ctrl_c():
            return args.fn(args)
    except PrunetuneError as e:  # one line; its branch gives the exit status (bad input 2, failed run 1)
        print(f"prunetune: {'error: ' if isinstance(e, BadInput) else ''}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a command other than run and resume (export, inspect, ...)
        how, code = _interrupt()
        print(f"prunetune: {how}", file=sys.stderr)
        return code
    except BrokenPipeError:  # the reader of our output went away (`prunetune report RUN | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
