"""``ess_window="step"``: one ESS over the whole optimizer step, whatever the micro-batch split.

The same optimizer steps (16 sequences each: the same generation, the same shuffle) are run by
TRL's own training loop split into 1, 2, 4 and 8 gradient-accumulation micro-batches, with vLLM-style
sampler log-probabilities (``trl_helpers.StandInVLLM``) and ``num_iterations=2``: step 1 is the
first step after a generation (the free path: statistics from the log-probs in hand), step 2
reuses the batch after an update (the no-grad pre-pass). Recorded: the ESS of every loss call
and the summed gradient of every optimizer step (``on_pre_optimizer_step``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

import ess_po.integrations.trl as trl_adapter
from transformers import TrainerCallback
from trl_helpers import flat_grad, make_vllm_trainer, run_two_processes

SEQUENCES_PER_STEP = 16


class _StepGradients(TrainerCallback):
    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(flat_grad(model).clone())


def _run(tmp_path, monkeypatch, *, accum: int, window: str):
    calls: list[float] = []
    core = trl_adapter.ess_policy_loss

    def recording_loss(*args, **kwargs):
        out = core(*args, **kwargs)
        calls.append(float(out.ess))
        return out

    monkeypatch.setattr(trl_adapter, "ess_policy_loss", recording_loss)
    trainer = make_vllm_trainer(
        tmp_path / f"{window}-{accum}",
        per_device_train_batch_size=SEQUENCES_PER_STEP // accum,
        gradient_accumulation_steps=accum,
        num_iterations=2,
        max_steps=2,
        max_grad_norm=0.0,  # no clipping: compare raw summed gradients
        ess_window=window,
    )
    recorder = _StepGradients()
    trainer.add_callback(recorder)
    trainer.train()
    ess = torch.tensor(calls).reshape(2, accum)  # (optimizer step, micro-batch)
    return ess, recorder.grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.slow
def test_step_window_is_invariant_to_the_micro_batch_split(tmp_path, monkeypatch):
    """Mutations checked, each fails: no pre-pass (``stats = None``: per-call ESS); the pre-pass
    over the current micro-batch only (``range(1)``); the free path on every step
    (``fresh = True``: stale log-probs on the reused batch)."""
    # the reference: one micro-batch per step, per-call ESS = the ESS of the whole step
    whole, whole_grads = _run(tmp_path, monkeypatch, accum=1, window="micro_batch")
    assert whole[0, 0] < 0.99  # step 1: the sampler mismatch (free path)
    assert whole[1, 0] < whole[0, 0]  # step 2: plus one update of drift (pre-pass)
    for accum in (1, 2, 4, 8):
        ess, grads = _run(tmp_path, monkeypatch, accum=accum, window="step")
        # one ESS per step, shared by its micro-batches, equal to the whole step's
        torch.testing.assert_close(ess, whole.expand(2, accum), rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, whole_grads, strict=True):
            assert want.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_micro_batch_window_depends_on_the_split(tmp_path, monkeypatch):
    """The default (the reference implementation's per-call ESS) is not invariant: with 4
    micro-batches each call sees its own ESS, and the step's gradient changes."""
    whole, whole_grads = _run(tmp_path, monkeypatch, accum=1, window="micro_batch")
    split, split_grads = _run(tmp_path, monkeypatch, accum=4, window="micro_batch")
    assert (split - whole).abs().max() > 1e-3
    assert _rel(split_grads[1], whole_grads[1]) > 1e-3


@pytest.mark.slow
def test_step_window_two_processes(tmp_path):
    """2 gloo ranks, 2 micro-batches each per step: every loss call of a step, on both ranks,
    uses one ESS (the step's, over both ranks). Mutation checked: the statistics not all-reduced
    (``step_stats(parts, sync=False)``) fails it."""
    ranks = run_two_processes(tmp_path, "step")
    ess = [torch.tensor(r["ess"]).reshape(2, 2) for r in ranks]  # (step, micro-batch)
    torch.testing.assert_close(ess[0], ess[1], rtol=0, atol=0)
    torch.testing.assert_close(ess[0], ess[0][:, :1].expand(2, 2), rtol=0, atol=0)
    assert ess[0][1, 0] < 1 - 1e-4  # the reused batch, after one update
