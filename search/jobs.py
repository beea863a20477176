"""Ray Jobs: submit a search to a cluster and follow it (Ray's JobSubmissionClient)."""
from __future__ import annotations

import os
import shlex
import shutil
import tempfile

import yaml

from prunetune.workers.files import write_text

from .config import ConfigError, from_dict, read_config


def auth_headers() -> dict:
    """Bearer-token header for Ray's token authentication, when RAY_AUTH_MODE=token opts in.

    The token comes from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (Ray's own
    lookup order). Without the opt-in no token is sent, so it never leaks to an address you did not mean.
    """
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = os.path.expanduser(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"))
    if not token and os.path.isfile(path):
        with open(path) as f:
            token = f.read().strip()
    if not token:
        raise ConfigError("RAY_AUTH_MODE: token authentication is on but no token was found "
                          f"(set RAY_AUTH_TOKEN or create {path} with `ray get-auth-token --generate`)")
    return {"Authorization": f"Bearer {token}"}


def client(address: str | None):
    """A JobSubmissionClient for the dashboard address (or $RAY_ADDRESS), authenticated when configured."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("--address: give the cluster's dashboard address, e.g. http://HEAD:8265 (or set RAY_ADDRESS)")
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except ConfigError:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0]
        if "Unauthorized" in reason or "Authentication" in reason:
            raise ConfigError(f"--address: the Ray job API at {address} requires token authentication; set "
                              "RAY_AUTH_MODE=token (token from RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None
        raise ConfigError(f"--address: cannot reach the Ray job API at {address} ({reason})") from None


def submit(config_path: str | None, address: str | None, overrides: list[str], python: str = "python",
           working_dir: str | None = None, job_id: str | None = None) -> str:
    """Submit `prunetune run` as a Ray Job; the config travels in the job's working dir. Returns the job id."""
    raw = read_config(config_path, overrides)  # as typed: ~ and $VARIABLES in paths are the cluster's to expand
    cfg = from_dict(raw)  # refuse a bad config here, not on the cluster
    staging = tempfile.mkdtemp(prefix="prunetune-job-")
    try:
        if working_dir:
            shutil.copytree(working_dir, staging, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info", ".venv"))
        staged_config = os.path.join(staging, "prunetune-job.yaml")
        if not os.path.isabs(cfg.output.dir):
            name = os.path.basename(os.path.normpath(cfg.output.dir))
            raw["output"] = {**(raw.get("output") or {}), "dir": os.path.join("~/prunetune-runs", name)}
        write_text(staged_config, yaml.safe_dump(raw, sort_keys=False))
        entrypoint = f"{shlex.quote(python)} -m prunetune run prunetune-job.yaml --address auto"
        jobs = client(address)
        try:
            return jobs.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": staging}, submission_id=job_id)
        except RuntimeError as e:
            raise ConfigError(_refusal(address or os.environ.get("RAY_ADDRESS"), str(e))) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _refusal(address: str, error: str) -> str:
    """One line for a job the cluster's job API would not take: the cause, and the fix where it is known."""
    reason = error.splitlines()[0][:200]
    if "No available agent" in error:
        return (f"--address: the Ray cluster at {address} has no dashboard agent to run the job ({reason}): the head's "
                "dashboard agent is not running, usually because its port (52365 by default) was taken when the head "
                "started; restart the head with a free port (`ray stop; ray start --head "
                "--dashboard-agent-listen-port=PORT`), see /tmp/ray/session_latest/logs/dashboard_agent.log")
    return f"--address: the Ray job API at {address} did not accept the job ({reason})"


def status(job_id: str, address: str | None) -> str:
    """One line: the job's status and message (ConfigError if the cluster has no such job)."""
    c = client(address)
    try:
        info = c.get_job_info(job_id)
    except RuntimeError as e:
        raise ConfigError(f"status: the cluster at {address or os.environ.get('RAY_ADDRESS')} has no job '{job_id}' "
                          f"({str(e).splitlines()[0][:120]})") from None
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
