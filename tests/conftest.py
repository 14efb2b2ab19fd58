from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(min(2, torch.get_num_threads()))


@dataclass
class Batch:
    logp_new: torch.Tensor
    logp_old: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor


def make_batch(
    B: int = 4,
    T: int = 7,
    *,
    seed: int = 0,
    staleness: float = 0.5,
    dtype: torch.dtype = torch.float64,
    adv_shape: str = "B",
    empty_rows: int = 0,
) -> Batch:
    """Right-padded completions of random lengths; logp_old = logp_new + N(0, staleness²)."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + staleness * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[:empty_rows] = 0
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    if adv_shape == "B":
        adv = torch.randn(B, generator=g, dtype=torch.float64)
    elif adv_shape == "B1":
        adv = torch.randn(B, 1, generator=g, dtype=torch.float64)
    else:
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return Batch(logp.to(dtype).requires_grad_(True), old.to(dtype), adv.to(dtype), mask)


@pytest.fixture
def batch() -> Batch:
    return make_batch()
