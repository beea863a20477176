"""Ray itself: connect to a cluster or start an embedded one, check what it can run, validate cluster.yaml."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import secrets
import signal
import socket
import threading

import yaml

from prunetune.workers.errors import RunFailed
from prunetune.workers import progress
from prunetune.workers.logs import RUN

from .config import Config, ConfigError


def tune_settings() -> None:
    """Tune settings for many short trials (no per-trial result files, no snapshot-rate warnings), and Ctrl-C as
    an interrupt: Tune's own SIGINT handler would end the stage as if it had finished."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray.tune.analysis.experiment_analysis", "ray.tune.tune", "ray.tune.execution.experiment_state"):
        logging.getLogger(name).setLevel(logging.ERROR)


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Refuse, in one line, a HOST:PORT address where nothing answers (ray.init would retry for minutes)."""
    if not address:
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form only Ray understands
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"--address: no Ray cluster answers at {address} ({e.strerror or e}); check the address, or "
                          "leave it out to run on an embedded Ray") from None


def connect(cfg: Config, address: str | None = None) -> bool:
    """Connect to the configured Ray cluster, or start an embedded one; True if this call started Ray.

    Without an address the embedded Ray is always a new local instance: a RAY_ADDRESS variable or a stale
    ray_current_cluster file never makes a plain `prunetune run` join someone else's cluster.
    """
    import ray

    tune_settings()
    if ray.is_initialized():
        return False
    address = address or cfg.ray.address
    if address:
        check_address(address)
        _init_keeping_signal_handlers(address=address, log_to_driver=False)
        return True
    gpus = cfg.ray.num_gpus or 0
    if gpus > _cuda_devices():
        raise ConfigError(f"ray.num_gpus: {gpus} GPU declared, but torch sees {_cuda_devices()} CUDA device on this "
                          "machine; trials would run on the CPU")
    _private_token()
    context = start_embedded(
        num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=cfg.ray.dashboard,
        dashboard_host=cfg.ray.dashboard_host, log_to_driver=False, logging_level=logging.ERROR)
    dashboard = f" (dashboard http://{context.dashboard_url})" if context.dashboard_url else ""
    RUN.info(f"[ray] started an embedded Ray for this run{dashboard}")
    return True


class RayStartFailed(RunFailed, RuntimeError):
    """The embedded Ray did not start on any try; the message says why and what to do."""


START_TRIES = 3  # Ray 2.60 waits a fixed 30 s for its raylet to register (hard-coded in ray/_private/node.py, no
# setting): on a loaded machine only another try helps
_START_TIMED_OUT = "timed out during startup"  # in the Exception ray.init raises then


def start_embedded(**kwargs):
    """ray.init of a new local Ray, tried again (START_TRIES in all) when its raylet does not register in time;
    RayStartFailed in one line after the last try. The processes of a failed or interrupted try are ended."""
    import ray

    RUN.info("[ray] starting an embedded Ray for this run")
    for attempt in range(1, START_TRIES + 1):
        try:
            with _ending_new_processes_on_failure(), _without_unused_dashboard_errors(kwargs["include_dashboard"]), \
                    _without_idle_workers(), progress.waiting("[ray] still starting", RUN):
                return _init_keeping_signal_handlers(address="local", **kwargs)
        except Exception as e:
            if _START_TIMED_OUT not in str(e):
                raise
            ray.shutdown()
            if attempt < START_TRIES:
                RUN.info(f"[ray] the embedded Ray did not start in time (try {attempt} of {START_TRIES}); trying again")
    raise RayStartFailed(f"ray: the embedded Ray did not start: its raylet did not register within Ray's fixed 30 s, "
                         f"{START_TRIES} times (the machine is probably overloaded: see `uptime`); run again when "
                         "it is less busy, or join a running cluster with --address")


@contextlib.contextmanager
def _ending_new_processes_on_failure():
    """If the block fails or is interrupted, end the processes it started (a failed ray.init leaves its GCS, raylet
    and dashboard running until this process exits)."""
    import ray  # noqa: F401 (puts its own copy of psutil, ray/thirdparty_files, on the path)
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        yield
    except BaseException:
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        for process in started:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(started, timeout=5)  # reaped: no zombie stays behind for the next try
        raise


# Ray's raylet starts a worker process per CPU when the first driver connects (prestart_worker_first_driver); Tune's
# trial actors never take those idle workers (each trial actor starts its own), so they only cost start-up: about
# half a CPU second each, while the embedded Ray starts
_NO_IDLE_WORKERS = "RAY_prestart_worker_first_driver"


@contextlib.contextmanager
def _without_idle_workers():
    """While the block starts a Ray, its raylet prestarts no idle workers (unless the user set the variable)."""
    if _NO_IDLE_WORKERS in os.environ:
        yield
        return
    os.environ[_NO_IDLE_WORKERS] = "0"
    try:
        yield
    finally:
        del os.environ[_NO_IDLE_WORKERS]


class _DropDashboardStart(logging.Filter):
    """Drops the errors of the API server's start-up (`Failed to start the dashboard` and its log's last lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "start_api_server"


@contextlib.contextmanager
def _without_unused_dashboard_errors(dashboard: bool):
    """Without the dashboard, Ray 2.60 still starts its API server with usage statistics only, and logs errors when
    that is slow to start on a loaded machine; prunetune uses none of it, so those errors are dropped."""
    logger, drop = logging.getLogger("ray._private.services"), _DropDashboardStart()
    if not dashboard:
        logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _init_keeping_signal_handlers(**kwargs):
    """ray.init, keeping the SIGTERM handler the caller had: ray.init sets its own (exit 15, or a node drain) while it
    starts, and its C++ core adds one that prints a stack dump; prunetune stops on SIGTERM as on Ctrl-C (cli._stop),
    during the start-up too."""
    import ray
    import ray._private.utils as ray_utils  # private: wrapped here only

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    if before is None:  # off the main thread, or a handler not set from Python (it cannot be put back)
        return ray.init(**kwargs)
    set_handler = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        return ray.init(**kwargs)
    finally:
        ray_utils.set_sigterm_handler = set_handler
        signal.signal(signal.SIGTERM, before)


def _private_token() -> None:
    """Create the token file a new local Ray reads (Ray's default path), readable by this user only, when it does
    not exist and the user has not configured Ray's authentication: Ray itself would create it readable by
    everyone. An existing file, and a configured authentication (RAY_AUTH_MODE, RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH), are left as they are."""
    if any(os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return
    path = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:  # it exists (kept as it is), or cannot be written (Ray then says so itself)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # as Ray's own generator: 256 random bits, hex


class _LogFile(logging.FileHandler):
    """A log file that drops a line it cannot write (a full disk) instead of printing a traceback per line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


@contextlib.contextmanager
def ray_output_to(path: str):
    """While the block runs, Ray's own messages go to the file `path`, not to the terminal: its loggers' lines
    (e.g. Tune's `Trial task failed` with its traceback) and the errors the raylet sends the driver (a worker that
    died). prunetune's own lines, on stdout and stderr, stay."""
    import ray._private.worker as ray_worker  # private: wrapped here only

    logger = logging.getLogger("ray")
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s:%(lineno)d -- %(message)s"))
    handlers, print_to_stdstream = logger.handlers[:], ray_worker.print_to_stdstream

    def to_log(data: dict, ignore_prefix: bool) -> None:
        for line in data.get("lines", []):
            logger.error("(%s) %s", data.get("pid", "ray"), line)

    logger.handlers = [handler]
    ray_worker.print_to_stdstream = to_log
    try:
        yield
    finally:
        ray_worker.print_to_stdstream = print_to_stdstream
        logger.handlers = handlers
        handler.close()


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_resources(cfg: Config) -> None:
    """Refuse trials that no node of the cluster can ever run (instead of pending forever), unless it autoscales."""
    import ray

    if cfg.resources.autoscaling:
        return
    r = cfg.resources
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for key, want, unit in (("GPU", r.gpus_per_trial, "gpus_per_trial"), ("CPU", r.cpus_per_trial, "cpus_per_trial")):
        largest = max((n.get(key, 0) for n in nodes), default=0)
        if want > largest:
            where = f"the Ray cluster has {ray.cluster_resources().get(key, 0):g} {key}" if largest == 0 else \
                f"the largest node of the Ray cluster has {largest:g} {key}"
            zero = "; set it to 0 for CPU trials" if key == "GPU" else ""
            raise ConfigError(f"resources.{unit}: {want:g} {key} per trial, but {where}{zero} (or "
                              "resources.autoscaling: true if the cluster adds nodes on demand)")


def validate_cluster_config(path: str) -> dict:
    """Load a cluster launcher YAML and run Ray's schema validation on it (no cloud account needed)."""
    from ray.autoscaler._private.util import prepare_config, validate_config  # private: wrapped here only

    with open(path) as f:
        config = yaml.safe_load(f)
    validate_config(prepare_config(copy.deepcopy(config)))
    return config
