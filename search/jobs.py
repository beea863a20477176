"""Ray Jobs: submit a search to a cluster and follow it (Ray's JobSubmissionClient)."""
from __future__ import annotations

import os
import shlex
import shutil
import tempfile

from .config import ConfigError, load_config


def client(address: str | None):
    """A JobSubmissionClient for the dashboard address (or $RAY_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("--address: give the cluster's dashboard address, e.g. http://HEAD:8265 (or set RAY_ADDRESS)")
    try:
        return JobSubmissionClient(address)
    except Exception as e:
        raise ConfigError(f"--address: cannot reach the Ray job API at {address} ({str(e).splitlines()[0]})") from None


def submit(config_path: str | None, address: str | None, overrides: list[str], python: str = "python",
           working_dir: str | None = None, job_id: str | None = None) -> str:
    """Submit `prunetune run` as a Ray Job; the config travels in the job's working dir. Returns the job id."""
    cfg = load_config(config_path, overrides)  # refuse a bad config here, not on the cluster
    staging = tempfile.mkdtemp(prefix="prunetune-job-")
    try:
        if working_dir:
            shutil.copytree(working_dir, staging, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info", ".venv"))
        staged_config = os.path.join(staging, "prunetune-job.yaml")
        from .config import save_config

        if not os.path.isabs(cfg.output.dir) and not cfg.output.dir.startswith("~"):
            cfg.output.dir = os.path.join("~/prunetune-runs", os.path.basename(os.path.normpath(cfg.output.dir)))
        save_config(cfg, staged_config)
        entrypoint = f"{shlex.quote(python)} -m search.cli run prunetune-job.yaml --address auto"
        return client(address).submit_job(entrypoint=entrypoint, runtime_env={"working_dir": staging},
                                          submission_id=job_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def status(job_id: str, address: str | None) -> str:
    """One line: the job's status and message."""
    info = client(address).get_job_info(job_id)
    return f"{job_id}: {info.status} {info.message or ''}".rstrip()


def logs(job_id: str, address: str | None, follow: bool = False) -> None:
    """Print the job's logs (and keep following them until it ends with follow=True)."""
    c = client(address)
    if not follow:
        print(c.get_job_logs(job_id), end="")
        return
    import asyncio

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
