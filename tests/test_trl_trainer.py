"""ESSGRPOTrainer on a tiny offline model: equivalences, the behaviour-policy path, config
handling, and end-to-end training runs for the GRPOConfig features users keep."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOConfig, GRPOTrainer
from trl_helpers import (
    first_inputs,
    flat_grad,
    logged,
    make_trainer,
    save_tiny_model,
)

from ess_po import ess_policy_loss

ESS_KEYS = (
    "ess/mean",
    "ess/min",
    "ess/capped_frac",
    "ess/kl_behavior",
    "ess/ratio_mean",
    "ess/ratio_max",
    "ess/regularizer_loss",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def _loss_and_grad(trainer, fn, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = fn(trainer.model, inputs)
    loss.backward()
    return loss.detach(), flat_grad(trainer.model)


# ---------------------------------------------------------------------------------------------
# On-policy equivalence: ESS = 1, so the gradient must equal GRPOTrainer's on the same
# inputs, for every supported normalisation and the extras (KL, entropy mask/bonus, truncation).
# ---------------------------------------------------------------------------------------------

ON_POLICY_CASES = {
    "dapo": {},
    "grpo": {"loss_type": "grpo"},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "luspo": {"loss_type": "luspo"},
    "dapo-accum": {"gradient_accumulation_steps": 2, "steps_per_generation": 2},
    "dapo-kl": {"beta": 0.1},
    "grpo-kl-truncated": {"loss_type": "grpo", "beta": 0.1, "mask_truncated_completions": True},
    "dapo-entropy": {"top_entropy_quantile": 0.5, "entropy_coef": 0.01},
    "bnpo-offpolicy-mask": {"loss_type": "bnpo", "off_policy_mask_threshold": 0.5},
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", list(ON_POLICY_CASES))
def test_on_policy_equals_grpo_trainer(tmp_path, model_dir, case, mode):
    config = ON_POLICY_CASES[case]
    trainer = make_trainer(tmp_path, model=str(model_dir), **config)
    inputs = first_inputs(trainer)
    if mode == "eval":
        trainer.model.eval()
    ess_loss, ess_grad = _loss_and_grad(trainer, trainer._compute_loss, inputs)
    ref_loss, ref_grad = _loss_and_grad(
        trainer, lambda m, x: GRPOTrainer._compute_loss(trainer, m, x), inputs
    )
    # Values differ by design (TRL's surrogate is -A * ratio, ESS's is -A * log pi); gradients agree.
    assert torch.isfinite(ess_loss) and torch.isfinite(ref_loss)
    torch.testing.assert_close(ess_grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert ess_grad.abs().sum() > 0
    metrics = trainer._metrics[mode]
    assert metrics["ess/mean"][-1] == pytest.approx(1.0, abs=1e-6)
    if config.get("beta"):
        assert len(metrics["kl"]) == 2  # logged by both objectives, same value
        assert metrics["kl"][0] == pytest.approx(metrics["kl"][1], rel=1e-5, abs=1e-7)


def test_gradient_equals_reinforce_with_trl_normalisation(tmp_path):
    """num_iterations=1, no reference model: one step's gradient is REINFORCE's, computed here
    independently of TRL's and ess_po's code: -sum(A * log pi * mask) / tokens in the batch."""
    trainer = make_trainer(tmp_path)
    inputs = first_inputs(trainer)
    assert "old_per_token_logps" not in inputs  # TRL's on-policy shortcut
    model = trainer.model
    _, ess_grad = _loss_and_grad(trainer, trainer._compute_loss, inputs)

    model.zero_grad(set_to_none=True)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    t = inputs["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, -t - 1 : -1].float()
    logits = logits / trainer.temperature
    logp = logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = inputs["completion_mask"].float()
    n_tokens = inputs["num_items_in_batch"].float()  # one GPU, GA = steps_per_generation = 1
    assert n_tokens == mask.sum()
    reinforce = -(inputs["advantages"].unsqueeze(1) * logp * mask).sum() / n_tokens
    reinforce.backward()
    torch.testing.assert_close(ess_grad, flat_grad(model), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Behaviour policy: the rollout engine's log-probabilities (vLLM / rollout_func) are logp_old.
# ---------------------------------------------------------------------------------------------


def _recorded_sampling_inputs(trainer, seed: int = 0):
    """Inputs with vLLM-like sampling log-probs injected: trainer log-probs + recorded noise."""
    inputs = first_inputs(trainer)
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attn, inputs["completion_ids"].size(1)
        )
    g = torch.Generator().manual_seed(seed)
    sampling = logp + 0.3 * torch.randn(logp.shape, generator=g)
    inputs = dict(inputs)
    inputs["sampling_per_token_logps"] = sampling
    # TRL's capped IS ratio: must NOT be applied on top of the ESS objective by default
    inputs["importance_sampling_ratio"] = torch.full_like(logp, 5.0)
    return inputs, logp, sampling


def test_sampling_logps_are_the_behaviour_policy(tmp_path):
    trainer = make_trainer(tmp_path)
    inputs, logp, sampling = _recorded_sampling_inputs(trainer)
    trainer.use_vllm = True  # as with vLLM generation (read by the loss only from here on)
    mask = inputs["completion_mask"].float()
    loss = trainer._compute_loss(trainer.model, inputs)
    expected = ess_policy_loss(
        logp, sampling, inputs["advantages"], mask, normalizer=inputs["num_items_in_batch"].float()
    )
    torch.testing.assert_close(loss.detach(), expected.loss, rtol=1e-5, atol=1e-6)
    ess = trainer._metrics["train"]["ess/mean"][-1]
    assert ess == pytest.approx(float(expected.ess), rel=1e-5)
    assert ess < 0.99  # the sampler/trainer mismatch shows in ESS

    # the importance-sampling ratio is ignored: changing it does not change the loss
    inputs["importance_sampling_ratio"] = torch.full_like(logp, 0.1)
    torch.testing.assert_close(trainer._compute_loss(trainer.model, inputs).detach(), loss.detach())


def test_sampling_logps_nan_fall_back_to_trainer_logps(tmp_path):
    trainer = make_trainer(tmp_path)
    inputs, logp, sampling = _recorded_sampling_inputs(trainer)
    nan_at = torch.zeros_like(sampling, dtype=torch.bool)
    nan_at[:, 0] = True
    inputs["sampling_per_token_logps"] = sampling.masked_fill(nan_at, float("nan"))
    loss = trainer._compute_loss(trainer.model, inputs)
    behaviour = torch.where(nan_at, logp, sampling)  # no old_per_token_logps on-policy
    expected = ess_policy_loss(
        logp,
        behaviour,
        inputs["advantages"],
        inputs["completion_mask"],
        normalizer=inputs["num_items_in_batch"].float(),
    )
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), expected.loss, rtol=1e-5, atol=1e-6)


def test_use_sampling_logps_false_keeps_trl_importance_ratio(tmp_path):
    trainer = make_trainer(tmp_path, trainer_kwargs={"use_sampling_logps": False})
    inputs, logp, _ = _recorded_sampling_inputs(trainer)
    trainer.use_vllm = True
    ratio = torch.rand(logp.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    inputs["importance_sampling_ratio"] = ratio
    loss = trainer._compute_loss(trainer.model, inputs)
    expected = ess_policy_loss(
        logp,
        logp,
        inputs["advantages"],
        inputs["completion_mask"],
        normalizer=inputs["num_items_in_batch"].float(),
        rollout_weights=ratio,
    )
    torch.testing.assert_close(loss.detach(), expected.loss, rtol=1e-5, atol=1e-6)
    assert trainer._metrics["train"]["ess/mean"][-1] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Options without meaning for ESS: refused or warned about, never silently ignored.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"use_liger_kernel": True}, "use_liger_kernel=False"),
        ({"loss_type": "cispo"}, "loss_type='cispo'"),
        ({"loss_type": "sapo"}, "loss_type='sapo'"),
        ({"loss_type": "vespo"}, "loss_type='vespo'"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level='token'"),
        ({"use_adaptive_entropy": True}, "static `entropy_coef`"),
    ],
)
def test_refused_options_name_the_fix(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, **config)


def test_clipping_options_warn_once(tmp_path):
    with pytest.warns(UserWarning, match="no clipping range") as record:
        make_trainer(tmp_path, epsilon=0.3, epsilon_high=0.28, delta=2.0)
    ours = [w for w in record if "no clipping range" in str(w.message)]
    assert len(ours) == 1
    for name in ("epsilon=0.3", "epsilon_high=0.28", "delta=2.0"):
        assert name in str(ours[0].message)


def test_default_config_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        make_trainer(tmp_path)


def test_bad_ess_scope(tmp_path):
    with pytest.raises(ValueError, match="ess_scope"):
        make_trainer(tmp_path, trainer_kwargs={"ess_scope": "token"})


# ---------------------------------------------------------------------------------------------
# End-to-end training runs (seconds each).
# ---------------------------------------------------------------------------------------------


def _params(model: torch.nn.Module, trainable: bool = True) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable
    }


def _assert_trained(trainer, before: dict[str, torch.Tensor]) -> None:
    after = dict(trainer.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert changed, "no trainable parameter changed"
    losses = logged(trainer, "loss")
    assert losses and all(math.isfinite(v) for v in losses)
    for key in (*ESS_KEYS, "policy_loss", "entropy"):
        values = logged(trainer, key)
        assert len(values) == trainer.state.global_step, key
        assert all(math.isfinite(v) for v in values), key


@pytest.mark.slow
def test_train_on_policy_ess_is_one(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, bf16=True)  # TRL's default precision
    before = _params(trainer.model)
    trainer.train()
    _assert_trained(trainer, before)
    assert logged(trainer, "ess/mean") == pytest.approx([1.0] * 3, abs=1e-6)
    assert logged(trainer, "ess/capped_frac") == pytest.approx([0.0] * 3, abs=1e-6)


@pytest.mark.slow
def test_train_num_iterations_ess_falls_on_reuse(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, num_iterations=2)
    before = _params(trainer.model)
    trainer.train()
    _assert_trained(trainer, before)
    ess = logged(trainer, "ess/mean")
    # steps 1 and 3 are the first pass over a fresh generation batch, 2 and 4 reuse it
    assert ess[0] == pytest.approx(1.0, abs=1e-5) and ess[2] == pytest.approx(1.0, abs=1e-5)
    assert ess[1] < 1 - 1e-4 and ess[3] < 1 - 1e-4
    assert max(logged(trainer, "ess/ratio_max")[1::2]) > 1.0
    assert min(logged(trainer, "ess/kl_behavior")[1::2]) > 0.0


@pytest.mark.slow
def test_train_steps_per_generation_with_accumulation(tmp_path):
    # 4 micro-batches per generation, 2 per optimizer step: the second step is off-policy
    trainer = make_trainer(
        tmp_path, max_steps=2, gradient_accumulation_steps=2, steps_per_generation=4
    )
    before = _params(trainer.model)
    trainer.train()
    _assert_trained(trainer, before)
    ess = logged(trainer, "ess/mean")
    assert ess[0] == pytest.approx(1.0, abs=1e-5)
    assert ess[1] < 1 - 1e-4


@pytest.mark.slow
def test_train_kl_entropy_truncation_and_eval(tmp_path, model_dir):
    trainer = make_trainer(
        tmp_path,
        model=str(model_dir),
        eval_dataset=True,
        max_steps=2,
        num_iterations=2,
        beta=0.05,
        loss_type="grpo",
        top_entropy_quantile=0.5,
        entropy_coef=0.01,
        mask_truncated_completions=True,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=8,
    )
    assert trainer.ref_model is not None
    before = _params(trainer.model)
    trainer.train()
    _assert_trained(trainer, before)
    kl = logged(trainer, "kl")
    assert len(kl) == 2 and kl[1] > 0  # the policy moved away from the reference after step 1
    assert logged(trainer, "entropy_coef") == [0.01, 0.01]
    eval_ess = logged(trainer, "eval_ess/mean")
    assert eval_ess == pytest.approx([1.0], abs=1e-6)  # evaluation is on-policy
    assert all(math.isfinite(v) for v in logged(trainer, "eval_loss"))


@pytest.mark.slow
def test_train_peft_lora_with_reference_adapter_off(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(
        tmp_path,
        max_steps=2,
        num_iterations=2,
        beta=0.05,
        trainer_kwargs={"peft_config": config},
    )
    frozen = _params(trainer.model, trainable=False)
    before = _params(trainer.model)
    assert before and all("lora" in n for n in before)
    trainer.train()
    _assert_trained(trainer, before)
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(p, after[n].detach()) for n, p in frozen.items())
    assert logged(trainer, "ess/mean")[1] < 1 - 1e-5
    assert all(math.isfinite(v) for v in logged(trainer, "kl"))


@pytest.mark.slow
def test_checkpoint_mid_run_resumes(tmp_path):
    config = {"max_steps": 4, "num_iterations": 2, "save_strategy": "steps", "save_steps": 2}
    first = make_trainer(tmp_path, **config)
    first.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists()

    resumed = make_trainer(tmp_path, **config)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    after_resume = [
        h for h in resumed.state.log_history if h.get("step", 0) > 2 and "ess/mean" in h
    ]
    assert [h["step"] for h in after_resume] == [3, 4]
    assert after_resume[0]["ess/mean"] == pytest.approx(1.0, abs=1e-5)  # fresh generation batch
    assert after_resume[1]["ess/mean"] < 1 - 1e-4
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["global_step"] == 2
    assert all(math.isfinite(h["loss"]) for h in after_resume)


@pytest.mark.slow
def test_two_processes_share_one_ess(tmp_path):
    """2 CPU ranks (gloo, torchrun): ESS is global (identical on both ranks) while each rank's
    local diagnostics differ; metrics are gathered into the logs."""
    worker = Path(__file__).with_name("trl_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(worker),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ess0, ess1 = (torch.tensor(r["ess"]) for r in ranks)
    assert len(ess0) == len(ess1) >= 4
    torch.testing.assert_close(ess0, ess1)  # one ESS for the whole data-parallel batch
    assert ess0.min() < 1 - 1e-4  # the off-policy iteration
    assert ranks[0]["kl_behavior"] != ranks[1]["kl_behavior"]  # different local data
    assert ranks[0]["logged_ess"] and all(math.isfinite(v) for v in ranks[0]["logged_ess"])
    assert ranks[0]["params_changed"] and ranks[1]["params_changed"]


@pytest.mark.slow
def test_demo_script_writes_metrics_and_plot(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import train_tiny_grpo

    summary = train_tiny_grpo.main(
        [
            "--output-dir",
            str(tmp_path),
            "--steps",
            "4",
            "--warm-start-steps",
            "2",
            "--batch-size",
            "16",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("ess/mean" in r for r in rows)
    assert (tmp_path / "reward_ess.png").stat().st_size > 10_000
    assert summary["ess_max"] == pytest.approx(1.0, abs=1e-5) and summary["ess_min"] < 1.0


def test_config_roundtrip_keeps_user_config(tmp_path):
    """The trainer takes TRL's GRPOConfig unchanged (drop-in)."""
    trainer = make_trainer(tmp_path)
    assert isinstance(trainer.args, GRPOConfig)
    assert isinstance(trainer, GRPOTrainer)
    assert trainer.loss_type == "dapo"
