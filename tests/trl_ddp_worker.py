"""Worker for tests/test_trl_trainer.py::test_two_processes_share_one_ess (run under torchrun).

Trains ESSGRPOTrainer for a few steps on 2 CPU ranks (gloo) and writes, per rank, the ESS and
local behaviour KL that every loss call saw, plus the logged ess/mean.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

import ess_po.integrations.trl as trl_adapter  # noqa: E402
from trl_helpers import logged, make_trainer  # noqa: E402


def main(out_dir: Path) -> None:
    seen: dict[str, list[float]] = {"ess": [], "kl_behavior": []}
    core = trl_adapter.ess_policy_loss

    def recording_loss(*args, **kwargs):
        out = core(*args, **kwargs)
        seen["ess"].append(float(out.ess))
        seen["kl_behavior"].append(float(out.kl_behavior))
        return out

    trl_adapter.ess_policy_loss = recording_loss
    trainer = make_trainer(out_dir / "run", max_steps=4, num_iterations=2)
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.state
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    after = list(trainer.accelerator.unwrap_model(trainer.model).parameters())
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True))
    rank = trainer.accelerator.process_index
    result = {**seen, "logged_ess": logged(trainer, "ess/mean"), "params_changed": changed}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
