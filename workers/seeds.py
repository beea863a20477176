"""The one way prunetune derives a random stream from a user seed and what it is for."""
from __future__ import annotations

import zlib

import torch


def generator(seed: int, salt: int | str) -> torch.Generator:
    """A torch generator for `seed` and one use of it (a group's name, an image index): independent streams."""
    key = zlib.crc32(salt.encode()) if isinstance(salt, str) else int(salt)
    return torch.Generator().manual_seed(seed * 1_000_003 + key)
