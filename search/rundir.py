"""A run's output directory: its manifest (config hash, stage, stored rows) and the lock that guards it."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import socket
import time
import uuid

from prunetune.workers.errors import BadInput

from .config import Config, ConfigError, load_config, resumable, save_config
from .runfiles import MANIFEST, SUMMARY, Manifest, manifest_path, read_manifest, write
from .store import PART_NAME


def config_hash(cfg: Config) -> str:
    """Hash of what decides a run's results: every key a resume may not change (config.RESUMABLE), output.* aside
    (where the run lives, not what it computes)."""
    picked = {section: {k: v for k, v in keys.items() if not resumable(f"{section}.{k}")}
              for section, keys in cfg.to_dict().items() if section != "output"}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


# What a run writes besides its config.yaml and manifest: `RunDir.record` lists each of these in the manifest
# (key "files", paths relative to the run directory) before writing it, and `--overwrite` removes exactly the
# listed ones. A manifest from before that record (no "files") falls back to these fixed names, plus
# final/rankN.pt for N up to the run's top_k: never a pattern that could match a file of the user's.
LEGACY_FILES = ("leaderboard.json", "report.md", "report.png", "report-gamma.png", "latency-table.json",
                SUMMARY, "tune/search", "tune/finetune")


class RunLockedError(BadInput, RuntimeError):
    """Another live process holds the run's lock."""


class RunDir:
    """Paths and bookkeeping of one run's output directory."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.manifest_path = manifest_path(self.path)
        self.config_path = os.path.join(self.path, "config.yaml")
        self.lock_path = os.path.join(self.path, "run.lock")
        self.tune_path = os.path.join(self.path, "tune")
        self.final_path = os.path.join(self.path, "final")

    def exists(self) -> bool:
        """True if the directory holds a run manifest (manifest() refuses one prunetune did not write)."""
        return os.path.isfile(self.manifest_path)

    def manifest(self) -> Manifest:
        """The run manifest (an empty one, stage None, if there is none); ConfigError for a manifest file that is
        not a prunetune one."""
        return read_manifest(self.path) or Manifest()

    def update(self, **fields) -> Manifest:
        """Set fields of the manifest (atomic, durable write)."""
        manifest = dataclasses.replace(self.manifest(), **fields, updated=time.time())
        write(self.path, manifest)
        return manifest

    def load_config(self) -> Config:
        """The config the run was started with."""
        if not os.path.isfile(self.config_path):
            raise ConfigError(f"output.dir: {self.path} holds no prunetune run (no config.yaml)")
        return load_config(self.config_path)

    def check_free(self) -> None:
        """Raise RunLockedError if a live process holds the run's lock (read-only check)."""
        holder = self._holder()
        if holder is None or (holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()):
            return
        if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
            return  # stale: acquire() clears it
        raise RunLockedError(
            f"output.dir: {self.path} is in use by pid {holder.get('pid')} on {holder.get('host')} "
            f"(lock {self.lock_path}); wait for it, or remove the lock if that process is gone")

    def check_new(self, cfg: Config, overwrite: bool) -> None:
        """Refuse a file, a directory in use, one holding something else, or a run unless overwrite (read-only)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"output.dir: {self.path} is a file, not a directory")
        self.check_free()
        if not self.exists():
            if os.path.isdir(self.path) and set(os.listdir(self.path)) - {os.path.basename(self.lock_path)}:
                raise ConfigError(f"output.dir: {self.path} is not empty and holds no prunetune run; choose a new or "
                                  "empty directory")
            return
        same = self.manifest().config_hash == config_hash(cfg)
        if overwrite:
            return
        hint = f"continue it with `prunetune resume {self.path}`" if same else "it holds a different run"
        raise ConfigError(f"output.dir: {self.path} already holds a run ({hint}); pass --overwrite to start over")

    def create(self, cfg: Config, overwrite: bool) -> None:
        """Start a fresh run directory; with overwrite, first remove what an earlier run wrote (nothing else)."""
        if self.exists() and overwrite:
            self._remove_run_files()
        os.makedirs(self.path, exist_ok=True)
        save_config(cfg, self.config_path)
        self.update(config_hash=config_hash(cfg), created=time.time(), stage="search", run_id=uuid.uuid4().hex[:12],
                    files=[])

    def record(self, *paths: str) -> None:
        """List `paths` (inside the run directory) in the manifest as written by this run; call it before writing
        them. `--overwrite` removes exactly what is listed (and config.yaml, the manifest, the result parts)."""
        files = self.manifest().files
        files = list(self._legacy_files() if files is None else files)  # a run started by an older prunetune
        new = [self._relative(p) for p in paths]
        if not set(new) <= set(files):
            self.update(files=sorted(set(files) | set(new)))

    def _relative(self, path: str) -> str:
        rel = os.path.normpath(os.path.relpath(os.path.join(self.path, path), self.path))
        if rel == "." or rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
            raise ValueError(f"{path} is not inside the run directory {self.path}")
        return rel.replace(os.sep, "/")

    def _legacy_files(self) -> list[str]:
        """What a run without a "files" record wrote: the fixed names, final/rankN.pt for N up to its top_k."""
        try:
            top_k = load_config(self.config_path).search.top_k
        except Exception:  # no or unreadable config: no model names can be claimed as the run's
            top_k = 0
        return [*LEGACY_FILES, *(f"final/rank{n}.pt" for n in range(1, top_k + 1))]

    def _remove_run_files(self) -> None:
        """Delete exactly what the run wrote: the files and Tune folders its manifest lists, its result parts,
        config.yaml and the manifest. A user's own files stay, exports (`prunetune export`) included."""
        files = self.manifest().files
        for rel in self._legacy_files() if files is None else files:
            try:
                rel = self._relative(rel)
            except (TypeError, ValueError):
                continue  # a hand-edited manifest: never reach outside the run directory
            path = os.path.join(self.path, rel)
            if os.path.isdir(path) and not os.path.islink(path):
                if rel.split("/")[0] == "tune":  # a Tune experiment folder: all of it is Tune's
                    shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
        store = os.path.join(self.path, "candidates.parquet")
        for name in os.listdir(store) if os.path.isdir(store) else []:
            if PART_NAME.fullmatch(name):
                os.remove(os.path.join(store, name))
        for name in ("config.yaml", MANIFEST):
            if os.path.isfile(os.path.join(self.path, name)):
                os.remove(os.path.join(self.path, name))
        for folder in (self.tune_path, store, self.final_path):
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)

    def acquire(self) -> None:
        """Take the run lock (pid and host inside); a stale lock of a dead local process is cleared.

        The lock is written to a temporary file and hard-linked into place, so it never exists half-written.
        """
        os.makedirs(self.path, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        tmp = f"{self.lock_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(me, f)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.lock_path)
                    return
                except FileExistsError:
                    holder = self._holder()
                    if holder and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                        return
                    if holder is None or (holder.get("host") == me["host"] and not _alive(holder.get("pid"))):
                        os.remove(self.lock_path)  # stale (or unreadable): its process is gone
                        continue
                    self.check_free()
            raise RunLockedError(f"output.dir: could not take the lock {self.lock_path}")
        finally:
            os.remove(tmp)

    def _holder(self) -> dict | None:
        try:
            with open(self.lock_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Drop the lock if this process holds it."""
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            os.remove(self.lock_path)


def no_space(e: BaseException | None) -> OSError | None:
    """The `No space left on device` (or quota) error behind `e`: itself, one it was raised from or during, or the
    cause a Ray task error carries; None if there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
