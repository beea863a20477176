"""Throughput of the search driver on a simulated cluster, and the cost of a proposal per search algorithm.

1. Driver throughput: a `ray.cluster_utils.Cluster` (a head without GPUs and fake-GPU nodes, on 127.0.0.1) runs the
   real driver path (prepare -> ensure_base -> stages.run_search on a tiny digits search, one fake GPU per trial,
   `--slots` trials at a time) over `--candidates` candidates, where each candidate's evaluation is a fixed sleep of
   `--candidate-s` seconds that returns a plausible record (score: a seeded hash of the ratios; FLOPs and params from
   the space). The replacement is installed by this bench in every Ray worker (`_install`, Ray's
   worker_process_setup_hook), never by a fault path in shipped code; each replaced evaluation logs
   (pid, start, end, index) to a file per process. Reported: candidates/s against the ideal slots / candidate-s
   (over the whole run_search call, and in the steady state: the middle 80% of completions), the driver process's
   CPU seconds per candidate (Tune's controller runs in the driver process), the gap from a worker finishing one
   candidate to starting its next (p50, p99), where the machine's CPU went (driver, trial workers, raylets, GCS,
   other Ray processes, the rest of the machine) and the least memory available during the run.
2. Proposal cost: each search algorithm (random, evolution, tpe) observes 100 / 1,000 / 5,000 fake records on
   ResNet-50's space (224 px, 37 groups), then proposes the next candidates: median ms per proposal, both in a row
   (no record arrives in between) and with a record observed before each proposal (as Tune's one-at-a-time suggest
   sees them).

python bench/scale.py                                     # 32 slots x 0.25 s x 5,000 candidates (ideal 128/s)
python bench/scale.py --slots 8,16 --candidates 1000      # one run per slot count, same cluster
python bench/scale.py --skip-cluster                      # the proposal table only
python bench/scale.py --smoke                             # 2 slots x 20 candidates of 0.01 s; proposals at 20/50
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback nodes stay loopback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _on_path() -> None:
    """The repository root on sys.path (for bench.* and tests.*), after PYTHONPATH's entries, so a PYTHONPATH that
    points at another copy of prunetune (a before/after comparison) keeps precedence over this checkout's."""
    first = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    for entry in reversed(first):
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


_on_path()

LOG_DIR, CANDIDATE_S = "PRUNETUNE_SCALE_LOG_DIR", "PRUNETUNE_SCALE_CANDIDATE_S"
WORKER_GIB = 0.45  # what one trial process (torch imported, a digits evaluator) is assumed to need, for the check


def fake_record(space, ratios, index: int):
    """A plausible record of a strategy without evaluating it: its score a seeded hash of the ratios (0.5-0.9), its
    FLOPs, params and kept units from the space."""
    import numpy as np

    from prunetune.workers.record import CandidateRecord

    ratios = [float(r) for r in ratios]
    digest = hashlib.blake2b(np.asarray(ratios, dtype=np.float64).tobytes(), digest_size=8).digest()
    score = 0.5 + 0.4 * int.from_bytes(digest, "little") / 2 ** 64
    flops = space.flops(ratios)
    return CandidateRecord(index, ratios, kept_units=space.kept_units(ratios), flops=flops,
                           flops_ratio=flops / space.base_flops, params=space.params(ratios), score=score,
                           accuracy=score, loss=1.0 - score, bn_recalibrated=True, calibration_batches=1,
                           t_prune=0.0, t_calibrate=0.0, t_score=0.0, device="cpu")


def _install() -> None:
    """Ray worker_process_setup_hook: CandidateEvaluator.evaluate becomes a sleep of $PRUNETUNE_SCALE_CANDIDATE_S that
    returns fake_record(...), and logs `pid start end index` to $PRUNETUNE_SCALE_LOG_DIR/PID.log."""
    from prunetune.workers import evaluator

    delay, folder = float(os.environ[CANDIDATE_S]), os.environ[LOG_DIR]
    path = os.path.join(folder, f"{os.getpid()}.log")
    log = None

    def evaluate(self, ratios, index: int = 0):
        nonlocal log
        start = time.time()
        record = fake_record(self.space, ratios, index)
        time.sleep(max(0.0, delay - (time.time() - start)))
        end = time.time()
        if log is None:  # opened by the first candidate: Ray's other workers leave no file
            log = open(path, "a", buffering=1)
            log.write(f"# {evaluator.__file__}\n")  # which prunetune the worker runs
        log.write(f"{os.getpid()} {start:.6f} {end:.6f} {index}\n")
        return record

    evaluator.CandidateEvaluator.evaluate = evaluate


def read_logs(folder: str) -> tuple[list[tuple[int, float, float, int]], set[str]]:
    """Every logged evaluation (pid, start, end, index), and the evaluator modules the workers ran."""
    entries, modules = [], set()
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            for line in f:
                if line.startswith("# "):
                    modules.add(line[2:].strip())
                elif line.strip():
                    pid, start, end, index = line.split()
                    entries.append((int(pid), float(start), float(end), int(index)))
    return entries, modules


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation); None for no values."""
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def slot_figures(entries, slots: int, candidate_s: float) -> dict:
    """Gaps between a worker's consecutive candidates, the steady-state rate and how busy the slots were."""
    by_pid: dict[int, list] = {}
    for pid, start, end, _ in entries:
        by_pid.setdefault(pid, []).append((start, end))
    gaps = []
    for runs in by_pid.values():
        runs.sort()
        gaps += [b[0] - a[1] for a, b in zip(runs, runs[1:])]
    ends = sorted(e[2] for e in entries)
    first_start, last_end = min(e[1] for e in entries), max(ends)
    lo, hi = int(0.1 * len(ends)), int(0.9 * len(ends)) - 1
    steady = (hi - lo) / (ends[hi] - ends[lo]) if hi > lo and ends[hi] > ends[lo] else None
    busy = sum(e[2] - e[1] for e in entries) / (slots * (last_end - first_start)) if last_end > first_start else None
    return {"worker_processes": len(by_pid), "gap_p50_ms": _ms(percentile(gaps, 50)),
            "gap_p99_ms": _ms(percentile(gaps, 99)), "gap_max_ms": _ms(max(gaps) if gaps else None),
            "steady_candidates_per_s": steady, "steady_of_ideal": steady / (slots / candidate_s) if steady else None,
            "slot_busy_fraction": busy, "first_start": first_start, "last_end": last_end}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


class Watch:
    """Samples, every `interval` s in a thread of the driver, the CPU time of every process this driver started
    (the cluster's GCS, raylets, agents, workers: all its descendants) and the memory the machine has available.
    A process's CPU is counted up to its last sample (a process that lives less than `interval` may be missed)."""

    def __init__(self, interval: float = 2.0):
        import ray  # noqa: F401 (puts Ray's psutil on sys.path)
        import psutil

        self.psutil, self.interval = psutil, interval
        self.me = psutil.Process()
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds at the last sample)
        self.start_cpu: dict[int, float] = {}
        self.min_available = float("inf")
        self.max_rss = 0.0
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def kind(process) -> str:
        """What a process of the cluster is (looked at each sample: a worker renames itself once it runs)."""
        try:
            command = " ".join(process.cmdline()) or process.name()
        except Exception:
            command = process.name()
        program = os.path.basename(command.split()[0]) if command.split() else ""
        if program == "raylet":
            return "raylets"
        if program == "gcs_server":
            return "gcs"
        if "default_worker.py" in command:
            return "ray workers (trials, idle)"
        if any(k in command for k in ("DashboardAgent", "RuntimeEnvAgent", "dashboard/agent.py", "runtime_env/agent",
                                      "log_monitor", "monitor.py", "dashboard.py")):
            return "ray agents, monitors"
        if command.startswith("ray::") or "default_worker.py" in command:
            return "ray workers (trials, idle)"
        return f"other ({program[:30]})"

    def sample(self) -> None:
        rss = self.me.memory_info().rss
        for p in self.me.children(recursive=True):
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    used = t.user + t.system
                    rss += p.memory_info().rss
                    kind = self.kind(p)
            except self.psutil.Error:
                continue
            self.cpu[p.pid] = (kind, used)
            self.start_cpu.setdefault(p.pid, 0.0 if self._started else used)
        self.max_rss = max(self.max_rss, rss)
        self.min_available = min(self.min_available, self.psutil.virtual_memory().available)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()  # what the processes had used before the run
        self.baseline = set(self.cpu)
        self._started = True
        self.machine0, self.wall0 = self.psutil.cpu_times(), time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()
        self.machine1, self.wall1 = self.psutil.cpu_times(), time.time()

    def figures(self, driver_cpu: float) -> dict:
        """CPU seconds per kind of process over the run, the machine's busy CPU seconds, memory."""
        used: dict[str, float] = {}
        for pid, (kind, cpu) in self.cpu.items():
            used[kind] = used.get(kind, 0.0) + cpu - self.start_cpu.get(pid, 0.0)
        busy = sum(getattr(self.machine1, f) - getattr(self.machine0, f) for f in ("user", "system", "nice", "irq",
                                                                                      "softirq", "steal")
                   if hasattr(self.machine1, f))
        cpu = {"driver": driver_cpu, **dict(sorted(used.items()))}
        cpu["rest of the machine (not this bench)"] = max(0.0, busy - sum(cpu.values()))
        started = sum(kind.startswith("ray workers") and pid not in self.baseline
                      for pid, (kind, _) in self.cpu.items())
        return {"cpu_s": cpu, "worker_processes_started": started, "machine_busy_cpu_s": busy,
                "machine_cpu_s": (self.wall1 - self.wall0) * os.cpu_count(),
                "min_available_gib": self.min_available / 2 ** 30, "max_rss_gib": self.max_rss / 2 ** 30}


def start_cluster(nodes: int, slots: int, cpus_per_trial: float, log_dir: str, candidate_s: float):
    """A head (1 CPU, no GPU) and `nodes` nodes with `slots` fake GPUs among them; the driver attached with the
    bench's runtime_env (the replaced evaluator, and PYTHONPATH as this process has it, then the repository)."""
    import ray
    from ray.cluster_utils import Cluster

    store = 128 * 2 ** 20  # the object store of each node (it holds one digits model and its evaluation data)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False, "object_store_memory": store})
    per_node = math.ceil(slots / nodes)
    for _ in range(nodes):
        cluster.add_node(num_cpus=max(1, math.ceil(per_node * cpus_per_trial)), num_gpus=per_node,
                         node_ip_address="127.0.0.1", object_store_memory=store)
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [ROOT]
    env = {"PYTHONPATH": os.pathsep.join(path), LOG_DIR: log_dir, CANDIDATE_S: str(candidate_s)}
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "bench.scale._install", "env_vars": env})
    return cluster


def search_config(args, folder: str, slots: int):
    """The tiny digits search (synthetic images in smoke mode), `slots` trials at a time, one fake GPU each."""
    from prunetune import load_config
    from prunetune.search.config import SearchConfig

    overrides = {"search.algorithm": args.algorithm, "search.num_candidates": args.candidates,
                 "search.max_concurrent_trials": slots, "resources.gpus_per_trial": 1,
                 "resources.cpus_per_trial": args.cpus_per_trial, "evaluation.calibration_batches": 2,
                 "evaluation.batch_size": 64, "evaluation.heldout_size": 64, "model.pretrain_epochs": 1,
                 "output.cache_dir": os.path.join(folder, "cache"), "output.dir": os.path.join(folder, "run")}
    if args.time_budget_s:
        overrides["search.time_budget_s"] = args.time_budget_s
    if "batch_size" in SearchConfig.model_fields:
        if args.batch_size is not None:
            overrides["search.batch_size"] = args.batch_size
    elif args.batch_size is not None:
        print(f"--batch-size {args.batch_size} ignored: this prunetune's SearchConfig has no batch_size", flush=True)
    if args.smoke:
        overrides.update({"data.name": "synthetic", "data.image_size": 8, "data.num_classes": 10,
                          "data.train_size": 256, "data.test_size": 64})
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def driver_throughput(args, folder: str) -> tuple[list[dict], object]:
    """One run_search per slot count on one simulated cluster; a row of figures per run, and the prepared search."""
    import ray
    import psutil  # Ray's copy (ray/thirdparty_files, on sys.path once ray is imported)

    from prunetune.search.prepare import ensure_base, prepare
    from prunetune.search.stages import run_search

    slot_counts = [int(s) for s in str(args.slots).split(",")]
    prep = ensure_base(prepare(search_config(args, folder, slot_counts[0])))
    batch = getattr(prep.cfg.search, "batch_size", None)
    log_root = os.path.join(folder, "evaluations")
    os.makedirs(log_root)
    print(f"[scale] driver pid {os.getpid()}; prunetune.search from {os.path.dirname(run_search.__code__.co_filename)}"
          f"; search.batch_size: {batch if batch is not None else 'no such key (one trial per candidate)'}", flush=True)
    cluster = start_cluster(args.nodes, max(slot_counts), args.cpus_per_trial, log_root, args.candidate_s)
    rows = []
    try:
        for n, slots in enumerate(slot_counts):
            need = slots * WORKER_GIB + 2
            available = psutil.virtual_memory().available / 2 ** 30
            if available < need and not args.smoke:
                print(f"[scale] {slots} slots skipped: {available:.1f} GiB available, ~{need:.0f} GiB needed "
                      f"({WORKER_GIB} GiB per trial process + 2)", flush=True)
                continue
            rows.append(one_run(args, prep, slots, os.path.join(folder, f"run-{slots}-{n}"), log_root))
            if not args.smoke:
                shutil.rmtree(os.path.join(folder, f"run-{slots}-{n}"), ignore_errors=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return rows, prep


def one_run(args, prep, slots: int, run_path: str, log_root: str) -> dict:
    """run_search with `slots` trials at a time; the figures of the run."""
    from prunetune.search.rundir import RunDir
    from prunetune.search.stages import run_search

    cfg = prep.cfg
    cfg.search.max_concurrent_trials = slots
    cfg.output.dir = run_path
    run = RunDir(run_path)
    run.create(cfg, overwrite=False)
    progress = os.path.join(os.path.dirname(run_path), f"progress-{slots}.txt")
    print(f"[scale] {slots} slots x {args.candidate_s:g} s x {args.candidates} candidates "
          f"({args.algorithm}); ideal {slots / args.candidate_s:.1f} candidates/s", flush=True)
    with Watch() as watch, open(progress, "w") as out, contextlib.redirect_stdout(out):
        cpu0, wall0 = time.process_time(), time.time()
        records = run_search(prep, run)
        cpu, wall = time.process_time() - cpu0, time.time() - wall0
    entries, modules = read_logs(log_root)
    entries = [e for e in entries if e[1] >= wall0]  # this run's (a worker process serves one run: Tune ends them)
    done = len(records)
    row = {"slots": slots, "candidate_s": args.candidate_s, "candidates": args.candidates, "stored": done,
           "algorithm": args.algorithm, "batch_size": getattr(cfg.search, "batch_size", None),
           "ideal_candidates_per_s": slots / args.candidate_s, "wall_s": wall,
           "candidates_per_s": done / wall, "of_ideal": done / wall / (slots / args.candidate_s),
           "driver_cpu_s": cpu, "driver_cpu_ms_per_candidate": 1000 * cpu / max(done, 1),
           "evaluations_logged": len(entries), "worker_modules": sorted(modules)}
    if entries:
        figures = slot_figures(entries, slots, args.candidate_s)
        row.update({k: v for k, v in figures.items() if k not in ("first_start", "last_end")})
        row["to_first_start_s"] = figures["first_start"] - wall0
        row["after_last_end_s"] = wall0 + wall - figures["last_end"]
    row.update(watch.figures(cpu))
    row["load_average_1min_after"] = os.getloadavg()[0]
    with open(progress) as f:
        lines = f.read().strip().splitlines()
    row["last_progress_line"] = lines[-1] if lines else None
    return row


def proposal_costs(args, prep=None) -> tuple[list[dict], dict]:
    """Median ms per proposal of each algorithm after observing each number of fake records, on args.space."""
    import torch

    from bench.common import bench_net
    from prunetune import PruningSpace, StrategySampler
    from prunetune.search.algorithms import ALGORITHMS

    t0 = time.perf_counter()
    if args.space == "run" and prep is not None:
        space, label = prep.space, f"the smoke search's {prep.cfg.model.name}"
    else:
        spec = "digits_cnn:16" if args.space == "run" else args.space  # "run": the search's space, when it ran
        model, shape = bench_net(spec)
        space, label = PruningSpace.from_model(model.eval(), torch.zeros(1, *shape)), spec
    sampler = StrategySampler(space, 0.5, 0.02, 0.7, seed=0)
    counts = [int(n) for n in str(args.records).split(",")]
    top = max(counts) + args.proposals
    records = [fake_record(space, sampler.sample(i), i) for i in range(top)]
    info = {"space": label, "groups": len(space.groups), "setup_s": time.perf_counter() - t0}
    print(f"[scale] proposals on {label} ({len(space.groups)} groups); {top} fake records in "
          f"{info['setup_s']:.1f} s", flush=True)
    rows = []
    for name in args.algorithms.split(","):
        make = ALGORITHMS[name]
        info[f"{name}.propose"] = str(inspect.signature(make(sampler, args.population).propose))
        warm = make(sampler, args.population)  # imports (optuna) and first-call costs outside the timing
        for r in records[:args.population + 1]:
            warm.observe(r)
        warm.propose(args.population + 1)
        batched = "horizon" in inspect.signature(make(sampler, args.population).propose).parameters
        batch = args.batch_size or 8
        for n in counts:
            row = {"algorithm": name, "records": n}
            for mode in ("in_a_row", "observe_between") + (("batch",) if batched else ()):
                algorithm = make(sampler, args.population)
                for r in records[:n]:
                    algorithm.observe(r)
                times = []
                for j in range(batch if mode == "batch" else args.proposals):
                    start = time.perf_counter()
                    if mode == "batch":  # a batch proposed at once, from the records before it (the searcher's way)
                        ratios = algorithm.propose(n + j, n)
                    else:
                        ratios = algorithm.propose(n + j)  # propose(index): with or without a `horizon` argument
                    times.append(time.perf_counter() - start)
                    if mode == "observe_between":
                        algorithm.observe(fake_record(space, ratios, n + j))
                    if mode != "batch" and len(times) >= 3 and sum(times) > args.proposal_budget_s:
                        break
                # a batch's first proposal builds what the others reuse: its cost per proposal is the mean
                row[f"{mode}_ms"] = 1000 * (statistics.fmean(times) if mode == "batch" else statistics.median(times))
                row[f"{mode}_first_ms"] = 1000 * times[0]
                row[f"{mode}_timed"] = len(times)
            rows.append(row)
            print(f"[scale]   {name} at {n} records: {row['in_a_row_ms']:.2f} ms in a row, "
                  f"{row['observe_between_ms']:.2f} ms with a record between" +
                  (f", {row['batch_ms']:.2f} ms per proposal in a batch of {batch}" if batched else ""), flush=True)
    return rows, info


def main() -> None:
    from bench.common import parse_args, save, smoke_dir, table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", default="32", help="concurrent trials (fake GPUs); a list runs each on one cluster")
    p.add_argument("--candidate-s", type=float, default=0.25, help="seconds one candidate's evaluation sleeps")
    p.add_argument("--candidates", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=None,
                   help="search.batch_size, where this prunetune has that key (default: its default)")
    p.add_argument("--algorithm", default="random", help="search.algorithm of the cluster runs")
    p.add_argument("--nodes", type=int, default=2, help="fake-GPU nodes the slots are spread over")
    p.add_argument("--cpus-per-trial", type=float, default=0.1, help="small: the fake GPUs limit the slots, not CPUs")
    p.add_argument("--time-budget-s", type=float, default=None, help="search.time_budget_s of each run (a cap)")
    p.add_argument("--space", default="resnet50:224",
                   help="the proposals' network, NAME:SIZE (bench_net), or `run`: the cluster runs' own space")
    p.add_argument("--records", default="100,1000,5000", help="records observed before the timed proposals")
    p.add_argument("--algorithms", default="random,evolution,tpe")
    p.add_argument("--population", type=int, default=16, help="search.population of the learning algorithms")
    p.add_argument("--proposals", type=int, default=10, help="proposals timed per cell (at least 3 ...)")
    p.add_argument("--proposal-budget-s", type=float, default=20.0, help="... and more only while under this time")
    p.add_argument("--skip-cluster", action="store_true")
    p.add_argument("--skip-proposals", action="store_true")
    p.add_argument("--name", default="scale", help="results file: bench/results/NAME.json")
    args = parse_args(p, {"slots": "2", "candidate_s": 0.01, "candidates": 20, "nodes": 1, "records": "20,50",
                          "space": "run", "proposals": 5, "proposal_budget_s": 5.0})
    folder = smoke_dir() or tempfile.mkdtemp(prefix="prunetune-scale-")
    started = time.time()
    rows, prep = ([], None) if args.skip_cluster else driver_throughput(args, folder)
    if rows:
        print("\ndriver throughput: each candidate a sleep of the given time in a Ray worker, the real driver path "
              "around it (Tune trials, searcher, store, leaderboard)")
        print(table(rows, ["slots", "candidate_s", "stored", "wall_s", "ideal_candidates_per_s", "candidates_per_s",
                           "of_ideal", "steady_candidates_per_s", "steady_of_ideal", "slot_busy_fraction",
                           "driver_cpu_ms_per_candidate", "gap_p50_ms", "gap_p99_ms", "worker_processes",
                           "worker_processes_started"]))
        print("worker_processes: the trial processes that evaluated candidates; worker_processes_started: Ray worker "
              "processes started during the run (seen by 2 s samples; each imports torch)")
        cpu_rows = [{"slots": r["slots"], **{k: v for k, v in r["cpu_s"].items()},
                     "machine_cpu_s": r["machine_cpu_s"], "min_available_gib": r["min_available_gib"],
                     "max_rss_gib": r["max_rss_gib"]} for r in rows]
        print("\nwhere the CPU went during each run (CPU seconds; the machine has "
              f"{os.cpu_count()} cores, machine_cpu_s = wall x cores) and memory:")
        print(table(cpu_rows, list(dict.fromkeys(k for r in cpu_rows for k in r))))
        print(f"\nNote: Ray's own processes (GCS, raylets, agents), every trial worker and the driver share this "
              f"machine's {os.cpu_count()} cores, so these figures mix the driver's limits with the machine's; "
              "driver CPU per candidate is the driver process's alone (Tune's controller runs in it).")
    prop_rows, prop_info = ([], {}) if args.skip_proposals else proposal_costs(args, prep)
    if prop_rows:
        print(f"\nproposal cost (ms per proposal, median) on {prop_info['space']} ({prop_info['groups']} groups), "
              "after observing the given number of fake records; in_a_row: no record between proposals, "
              "observe_between: one record observed before each proposal; batch: the mean over a batch proposed at "
              "once from the records before it, as the searcher hands candidates out")
        print(table(prop_rows, ["algorithm", "records", "in_a_row_ms", "in_a_row_first_ms", "observe_between_ms",
                                "batch_ms", "in_a_row_timed", "observe_between_timed"]))
    print(f"\n[scale] {time.time() - started:.0f} s in total")
    print("saved", save(args.name, {"args": vars(args), "throughput": rows, "proposals": prop_rows,
                                    "proposal_setup": prop_info}))
    if not smoke_dir():
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
