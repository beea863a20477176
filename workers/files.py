"""Atomic file writes: a file is either its old self or completely new, never torn by a kill."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None], durable: bool = False) -> None:
    """Run `write(tmp)` to a temporary name beside `path`, then rename it into place.

    durable: fsync the file (and its directory) before returning, for what a crash must not lose once it has
    been reported written: result parts, the manifest, models and checkpoints.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if durable:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str, text: str, durable: bool = False) -> None:
    """Write a text file atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write, durable)


def write_json(path: str, obj, durable: bool = False) -> None:
    """Write JSON atomically (indented, non-JSON values as strings)."""
    write_text(path, json.dumps(obj, indent=1, default=str), durable)


def unwritable(path: str) -> str | None:
    """Why directory `path` cannot be created or written, or None; the probe leaves nothing behind."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        return "it is a file, not a directory"
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".prunetune-probe-"))
    except OSError as e:
        return f"{e.strerror or e} in {existing}"
    return None
