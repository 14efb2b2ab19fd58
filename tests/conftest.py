from __future__ import annotations

import pytest
import torch

from ess_po.testing.batches import Batch, make_batch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def batch() -> Batch:
    return make_batch()
