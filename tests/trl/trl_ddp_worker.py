"""Worker for the 2-process TRL tests (run by path under torchrun).

Trains ESSGRPOTrainer for a few steps on 2 CPU ranks (gloo) and writes, per rank, the ESS and
local behaviour KL that every loss call saw, plus the logged ess/mean, with one ESS per loss call
(``ess_scope="call"``). With a second argument ``step``: ``ess_scope="step"`` with 2
gradient-accumulation micro-batches per optimizer step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# Run by path: Python puts this folder first on the import path, so the helpers import by name.
from trl_helpers import logged, make_trainer

import ess_po.integrations.trl.trainer as trl_adapter

torch.set_num_threads(1)


def main(out_dir: Path, mode: str = "call") -> None:
    seen: dict[str, list[float]] = {"ess": [], "kl_behavior": [], "ratio_min": []}
    core = trl_adapter.ess_policy_loss

    def recording_loss(*args, **kwargs):
        out = core(*args, **kwargs)
        seen["ess"].append(float(out.ess))
        seen["kl_behavior"].append(float(out.kl_behavior))
        seen["ratio_min"].append(float(out.ratio_min))
        return out

    trl_adapter.ess_policy_loss = recording_loss
    if mode == "step":
        config = {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4}
        trainer = make_trainer(
            out_dir / "run", max_steps=2, num_iterations=2, ess_scope="step", **config
        )
    else:
        trainer = make_trainer(out_dir / "run", max_steps=4, num_iterations=2, ess_scope="call")
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.state
    rank = trainer.accelerator.process_index
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    after = list(trainer.accelerator.unwrap_model(trainer.model).parameters())
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True))
    result = {
        **seen,
        "logged_ess": logged(trainer, "ess/mean"),
        "logged_ratio_min": logged(trainer, "ess/ratio_min"),
        "params_changed": changed,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    # Leave together: a rank that exits while the other is still inside a collective makes gloo
    # abort the survivor, and torchrun then reports a failure after a good run.
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown: freeing DDP's reducer at exit can deadlock against gloo's worker
    # thread (seen once under py-spy: main thread in the reducer's destructor, gloo's thread
    # waiting for the GIL). The results are already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
