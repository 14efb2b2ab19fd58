"""``ess_scope="step"`` (the default): one ESS over the whole optimizer step, whatever the
micro-batch split; ``"call"``: one ESS per loss call; ``"sequence"``: one ESS per sequence.

The same optimizer steps (16 sequences each: the same generation, the same shuffle) are run by
TRL's own training loop split into 1, 2, 4 and 8 gradient-accumulation micro-batches, with vLLM-style
sampler log-probabilities (``trl_helpers.StandInVLLM``) and ``num_iterations=2``: step 1 is the
first step after a generation (the free path: statistics from the log-probs in hand), step 2
reuses the batch after an update (the no-grad pre-pass). Recorded: the ESS of every loss call
(the per-sequence mean in sequence scope), whether the core got step statistics, and the summed
gradient of every optimizer step (``on_pre_optimizer_step``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from transformers import TrainerCallback
from trl_helpers import flat_grad, make_trainer, make_vllm_trainer, run_two_processes

import ess_po.integrations.trl.trainer as trl_adapter

SEQUENCES_PER_STEP = 16


class _StepGradients(TrainerCallback):
    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(flat_grad(model).clone())


def _run(tmp_path, monkeypatch, *, accum: int, scope: str | None, **config):
    """Train 2 steps split into ``accum`` micro-batches; ``scope=None``: ESSGRPOConfig's default.

    Returns the ESS of every call as (optimizer step, micro-batch), the step gradients, and
    whether each call passed step statistics to the core.
    """
    calls: list[float] = []
    with_stats: list[bool] = []
    core = trl_adapter.ess_policy_loss

    def recording_loss(*args, **kwargs):
        out = core(*args, **kwargs)
        calls.append(float(out.ess))
        with_stats.append(kwargs.get("stats") is not None)
        return out

    monkeypatch.setattr(trl_adapter, "ess_policy_loss", recording_loss)
    if scope is not None:
        config["ess_scope"] = scope
    trainer = make_vllm_trainer(
        tmp_path / f"{scope}-{accum}-{len(config)}",
        per_device_train_batch_size=SEQUENCES_PER_STEP // accum,
        gradient_accumulation_steps=accum,
        num_iterations=2,
        max_steps=2,
        max_grad_norm=0.0,  # no clipping: compare raw summed gradients
        **config,
    )
    recorder = _StepGradients()
    trainer.add_callback(recorder)
    trainer.train()
    ess = torch.tensor(calls).reshape(2, accum)  # (optimizer step, micro-batch)
    return ess, recorder.grads, with_stats


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.slow
def test_step_window_is_invariant_to_the_micro_batch_split(tmp_path, monkeypatch):
    """Mutations checked, each fails: no pre-pass (``stats = None``: per-call ESS); the pre-pass
    over the current micro-batch only (``range(1)``); the free path on every step
    (``fresh = True``: stale log-probs on the reused batch)."""
    # the reference: one micro-batch per step, per-call ESS = the ESS of the whole step
    whole, whole_grads, _ = _run(tmp_path, monkeypatch, accum=1, scope="call")
    assert whole[0, 0] < 0.99  # step 1: the sampler mismatch (free path)
    assert whole[1, 0] < whole[0, 0]  # step 2: plus one update of drift (pre-pass)
    for accum in (1, 2, 4, 8):
        ess, grads, _ = _run(tmp_path, monkeypatch, accum=accum, scope="step")
        # one ESS per step, shared by its micro-batches, equal to the whole step's
        torch.testing.assert_close(ess, whole.expand(2, accum), rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, whole_grads, strict=True):
            assert want.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_micro_batch_window_depends_on_the_split(tmp_path, monkeypatch):
    """The per-call window (the reference implementation's) is not invariant: with 4
    micro-batches each call sees its own ESS, and the step's gradient changes."""
    whole, whole_grads, _ = _run(tmp_path, monkeypatch, accum=1, scope="call")
    split, split_grads, _ = _run(tmp_path, monkeypatch, accum=4, scope="call")
    assert (split - whole).abs().max() > 1e-3
    assert _rel(split_grads[1], whole_grads[1]) > 1e-3


def test_default_window_is_invariant_to_the_micro_batch_split(tmp_path, monkeypatch):
    """ESSGRPOConfig's default is the step window: 16 sequences per step as 1 x 16 or 4 x 4
    (per_device_train_batch_size and gradient_accumulation_steps both change) give one ESS per
    step and the same step gradients. Mutation checked: the default ``ess_scope="call"``
    fails it."""
    whole, whole_grads, _ = _run(tmp_path, monkeypatch, accum=1, scope=None)
    split, split_grads, with_stats = _run(tmp_path, monkeypatch, accum=4, scope=None)
    assert all(with_stats)
    assert whole[1, 0] < 0.99  # off-policy: the window matters here
    torch.testing.assert_close(split, whole.expand(2, 4), rtol=1e-5, atol=1e-6)
    for got, want in zip(split_grads, whole_grads, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_sequence_scope_ignores_the_window(tmp_path, monkeypatch):
    """``ess_scope="sequence"``: no step statistics reach the core (it refuses them with a
    per-sequence ESS), and each sequence's ESS is over its own tokens, so the step gradient is the
    same for 1 x 16 and 4 x 4 micro-batches, and the deprecated per-call ``ess_window`` changes
    nothing. Mutation checked: the trainer passing step statistics whatever the scope fails it
    (the core's ValueError)."""
    whole, whole_grads, _ = _run(tmp_path, monkeypatch, accum=1, scope="sequence")
    _, split_grads, with_stats = _run(tmp_path, monkeypatch, accum=4, scope="sequence")
    with pytest.warns(FutureWarning, match="ess_window"):  # the old per-call window: ignored
        _, per_call_grads, _ = _run(
            tmp_path, monkeypatch, accum=4, scope="sequence", ess_window="micro_batch"
        )
    assert not any(with_stats)
    assert whole[1, 0] < 0.99
    for got, per_call, want in zip(split_grads, per_call_grads, whole_grads, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got, per_call, rtol=0, atol=0)


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


# (config, pre-pass forwards per optimizer step over 2 steps), 2 micro-batches per step
_PRE_PASS_CASES = {
    # TRL's defaults (num_iterations=1, steps_per_generation = GA): every step is free
    "defaults": ({}, [0, 0]),
    # step 2 reuses the batch after an update: one no-grad forward per micro-batch
    "num_iterations=2": ({"num_iterations": 2}, [0, 2]),
    # sampler log-probs and TRL's old_per_token_logps (its IS correction): free
    "vllm": ({"vllm": True}, [0, 0]),
    # sampler log-probs without old_per_token_logps (correction off): the forward every step
    "vllm-correction-off": ({"vllm": True, "vllm_importance_sampling_correction": False}, [2, 2]),
}


@pytest.mark.parametrize("case", list(_PRE_PASS_CASES))
def test_step_window_pre_pass_forwards(tmp_path, case):
    """The default window's cost, counted: the no-grad forwards of the pre-pass per optimizer
    step. Mutations checked, each fails: ``fresh = True`` (num_iterations=2: no forward on the
    reused batch); ``fresh = False`` (defaults: forwards on free steps); the free path without
    the ``sampling is None`` condition (vllm-correction-off: no forward, zero ratios)."""
    config, expected = _PRE_PASS_CASES[case]
    config = dict(config)
    make = make_vllm_trainer if config.pop("vllm", False) else make_trainer
    trainer = make(
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
        **config,
    )
    assert trainer.ess_scope == "step"
    steps: list[int] = []
    policy_logps = trainer._policy_logps

    def counting(model, inputs, *, compute_entropy=True):
        if not compute_entropy:  # the pre-pass; the loss's own forward computes entropies
            steps.append(trainer._step // 2)
        return policy_logps(model, inputs, compute_entropy=compute_entropy)

    trainer._policy_logps = counting
    trainer.train()
    assert [steps.count(step) for step in range(2)] == expected


def test_trl_config_with_steps_per_generation_not_a_multiple_trains(tmp_path, monkeypatch):
    """TRL's own ``test_prepare_input_called_with_correct_data`` configuration (steps_per_generation
    4, gradient_accumulation_steps 3, 6 sequences per micro-batch, 4 generations, 2 iterations, no
    shuffle, 3 epochs over 2 generation batches), which ``GRPOTrainer`` accepts: the step scope
    cannot see a step's micro-batches before its first backward, so the trainer warns naming the
    cause and the fix and uses one ESS per loss call; TRL's assertions on the batches hold.
    Mutation checked: the fallback removed (``step_scope_fallback`` returning the scope) fails it."""
    from unittest.mock import patch

    from trl import GRPOTrainer

    scopes: list[tuple[str, bool]] = []
    core = trl_adapter.ess_policy_loss

    def recording_loss(*args, **kwargs):
        scopes.append((kwargs["ess_scope"], kwargs.get("stats") is not None))
        return core(*args, **kwargs)

    monkeypatch.setattr(trl_adapter, "ess_policy_loss", recording_loss)
    with pytest.warns(UserWarning, match=r"steps_per_generation \(4\) is not a multiple") as rec:
        trainer = make_trainer(
            tmp_path,
            n_prompts=12,  # 2 generation batches of 6 prompts x 4 generations
            learning_rate=0.1,
            max_completion_length=8,
            gradient_accumulation_steps=3,
            steps_per_generation=4,
            num_generations=4,
            per_device_train_batch_size=6,
            num_iterations=2,
            shuffle_dataset=False,
            max_steps=-1,
            num_train_epochs=3,
            logging_steps=4,
        )
    message = str(next(w.message for w in rec if "steps_per_generation (4)" in str(w.message)))
    assert "gradient_accumulation_steps (3)" in message and "ess_scope='call'" in message
    assert trainer.ess_scope == "call"
    rows = [dict(trainer.train_dataset[i]) for i in range(12)]
    first = [row for row in rows[:6] for _ in range(4)]
    second = [row for row in rows[6:] for _ in range(4)]
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with patch.object(GRPOTrainer, "training_step", wraps=trainer.training_step) as mock:
        trainer.train()
        # 3 epochs * 2 iterations * 2 generation batches * 4 steps_per_generation
        assert mock.call_count == 48
        for i in range(8):  # each generation batch is used steps_per_generation * iterations times
            assert mock.call_args_list[i].args[1] == first
            assert mock.call_args_list[i + 8].args[1] == second
    assert len(scopes) == 48 and set(scopes) == {("call", False)}
    after = list(trainer.model.parameters())
    assert any(not torch.equal(a.detach(), b) for a, b in zip(after, before, strict=True))
    ess = [h["ess/mean"] for h in trainer.state.log_history if "ess/mean" in h]
    assert ess and all(0 < v <= 1 + 1e-6 for v in ess) and min(ess) < 1 - 1e-4


def _first_step_gradient(tmp_path, trainer_cls, *, accum: int, bf16: bool) -> torch.Tensor:
    from ess_po.testing.tiny import build_tiny_model, build_tiny_tokenizer

    trainer = make_trainer(
        tmp_path / f"{trainer_cls.__name__}-{accum}-{bf16}",
        trainer_cls=trainer_cls,
        model=build_tiny_model(build_tiny_tokenizer(), arch="llama"),
        per_device_train_batch_size=8 // accum,
        gradient_accumulation_steps=accum,
        max_steps=1,
        max_grad_norm=0.0,
        bf16=bf16,
    )
    recorder = _StepGradients()
    trainer.add_callback(recorder)
    trainer.train()
    return recorder.grads[0]


@pytest.mark.parametrize("trainer_name", ["GRPOTrainer", "ESSGRPOTrainer"])
def test_on_policy_split_changes_the_gradient_only_by_rounding(tmp_path, trainer_name):
    """The same on-policy step (8 sequences, one generation) as 8 x 1 or 2 x 4 micro-batches:
    in float32 the step gradients agree to float rounding, for TRL's GRPOTrainer and ours; under
    bf16 autocast (GRPOConfig's default bf16=True, active on CPU too) each micro-batch's backward
    rounds its contribution to bfloat16 before the float32 accumulation, so the summed gradient
    depends on the split at bf16 precision (about 1e-3 relative), in both trainers alike."""
    from trl import GRPOTrainer

    from ess_po.integrations.trl import ESSGRPOTrainer

    cls = {"GRPOTrainer": GRPOTrainer, "ESSGRPOTrainer": ESSGRPOTrainer}[trainer_name]
    for bf16, low, high in ((False, 0.0, 1e-5), (True, 1e-4, 3e-2)):
        whole = _first_step_gradient(tmp_path, cls, accum=1, bf16=bf16)
        split = _first_step_gradient(tmp_path, cls, accum=4, bf16=bf16)
        assert whole.abs().max() > 0
        assert low <= _rel(split, whole) < high, (bf16, _rel(split, whole))
