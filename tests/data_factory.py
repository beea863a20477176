"""A `package.module:function` data factory used by the tests."""
import torch
from torch.utils.data import TensorDataset


def make(n: int = 40, classes: int = 3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y), TensorDataset(x[:10], y[:10]), classes
