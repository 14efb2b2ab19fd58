"""ESSGRPOTrainer on a tiny offline model: equivalences, the behaviour-policy path, config
handling, and end-to-end training runs for the GRPOConfig features users keep."""

from __future__ import annotations

import importlib.util
import json
import math
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
    make_vllm_trainer,
    run_two_processes,
)

from ess_po import ess_policy_loss
from ess_po.testing.tiny import save_tiny_model

ESS_KEYS = (
    "ess/mean",
    "ess/min",
    "ess/capped_frac",
    "ess/capped_mass",
    "ess/kl_behavior",
    "ess/ratio_mean",
    "ess/ratio_max",
    "ess/ratio_min",
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
# Equality with GRPOTrainer: TRL's own `_compute_loss` on the same inputs, on-policy (ESS = 1),
# where the gradients must agree. Every case is built so that the line it protects matters, and
# each was run once against the mutation of the adapter named beside it, which it fails.
# ---------------------------------------------------------------------------------------------

EQUALITY_CASES = {
    # num_items_in_batch spans 2 micro-batches: mutation `n = n * accum` (drop
    # `/ steps_per_generation`) and mutation "normaliser = mask.sum()" both fail.
    "dapo": {"steps_per_generation": 2},
    # GA != steps_per_generation: mutation "swap accum and steps_per_generation" fails. The step
    # scope needs steps_per_generation to be a multiple of GA: one ESS per loss call here.
    "dapo-accum": {
        "gradient_accumulation_steps": 2,
        "steps_per_generation": 1,
        "ess_scope": "call",
    },
    # GA = 2 for the rest: mutation "drop `* accum`" in the loss type's branch fails.
    "grpo": {"loss_type": "grpo", "gradient_accumulation_steps": 2},  # mutation: token-mean
    "bnpo": {"loss_type": "bnpo", "gradient_accumulation_steps": 2},  # mutation: num_items_in_batch
    "dr_grpo": {"loss_type": "dr_grpo", "gradient_accumulation_steps": 2},  # mutation: mask.sum()
    "luspo": {"loss_type": "luspo", "gradient_accumulation_steps": 2},  # mutation: token-mean
    # mutation: the KL term aggregated as token-mean (no per-sequence mean) fails
    "grpo-kl": {"loss_type": "grpo", "beta": 0.1},
    # truncated completions are all-masked rows (TRL's completion mask): bnpo's token count
    "bnpo-truncated": {"loss_type": "bnpo", "mask_truncated_completions": True},
    # mutations: entropy bonus over all tokens (not the entropy-masked ones) / policy term
    # without the entropy mask: each fails
    "dapo-entropy": {"top_entropy_quantile": 0.5, "entropy_coef": 0.01},
}
FAST_CASES = ("dapo", "dapo-accum", "grpo")


def _case_params():
    for case in EQUALITY_CASES:
        modes = ("train", "eval") if case in ("dapo", "grpo") else ("train",)
        for mode in modes:
            marks = () if case in FAST_CASES and mode == "train" else (pytest.mark.slow,)
            yield pytest.param(case, mode, marks=marks, id=f"{case}-{mode}")


def _shifted_reference(inputs):
    """The reference model starts as the policy (zero KL gradient): move its log-probs."""
    ref = inputs["ref_per_token_logps"]
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    return {**inputs, "ref_per_token_logps": ref + 0.2 * noise}


def _grpo_loss(trainer):
    return lambda model, inputs: GRPOTrainer._compute_loss(trainer, model, inputs)


@pytest.mark.parametrize(("case", "mode"), list(_case_params()))
def test_on_policy_equals_grpo_trainer(tmp_path, model_dir, case, mode):
    """On-policy gradient == GRPOTrainer._compute_loss's (eval: the loss-type normaliser
    without accumulation; mutation "train scaling in eval" fails dapo-eval)."""
    config = EQUALITY_CASES[case]
    trainer = make_trainer(tmp_path, model=str(model_dir), **config)
    inputs = first_inputs(trainer)
    if config.get("beta"):
        inputs = _shifted_reference(inputs)
        lengths = inputs["completion_mask"].sum(-1)
        assert (lengths > 1).sum() >= 2  # per-sequence means differ from a token mean
    if mode == "eval":
        trainer.model.eval()
    ess_loss, ess_grad = _loss_and_grad(trainer, trainer._compute_loss, inputs)
    ref_loss, ref_grad = _loss_and_grad(trainer, _grpo_loss(trainer), inputs)
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
# vLLM-style inputs: TRL's vLLM generation path with a stand-in engine (trl_helpers.StandInVLLM)
# whose log-probabilities differ from the trainer's; TRL computes old_per_token_logps, its
# importance-sampling ratio and the off-policy mask from them with its own code.
# ---------------------------------------------------------------------------------------------

VLLM_MODES = {
    "sequence_mask": {},  # TRL's default vllm_importance_sampling_mode
    "token_truncate": {"vllm_importance_sampling_mode": "token_truncate"},
    "correction-off": {"vllm_importance_sampling_correction": False},
}
# a small threshold, so that TRL's off-policy mask drops sequences on the sampler mismatch
_MASK_THRESHOLD = 0.02


@torch.no_grad()
def _current_logps(trainer, inputs) -> torch.Tensor:
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logp, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, ids, attn, inputs["completion_ids"].size(1)
    )
    return logp


def _dropped_rows(trainer, inputs) -> int:
    """How many sequences TRL's off-policy mask drops on these inputs (sampler vs trainer)."""
    keep = GRPOTrainer.get_off_policy_mask(
        inputs["advantages"].unsqueeze(1),
        _current_logps(trainer, inputs),
        inputs["sampling_per_token_logps"],
        inputs["completion_mask"].float(),
        _MASK_THRESHOLD,
    )
    return int((keep == 0).sum())


@pytest.mark.parametrize(
    "vllm_mode",
    [pytest.param(m, marks=() if m == "sequence_mask" else pytest.mark.slow) for m in VLLM_MODES],
)
def test_use_sampling_logps_false_equals_grpo_trainer(tmp_path, model_dir, vllm_mode):
    """use_sampling_logps=False on vLLM-style inputs, on-policy for the trainer: the gradient is
    GRPOTrainer's, with TRL's importance-sampling ratio (both modes, and off), the off-policy
    mask computed from the sampler's log-probs (it drops sequences here) and bias-corrected KL.

    Mutations that fail it: the mask computed from old_per_token_logps (today's main before the
    fix: 41% off); the importance-sampling ratio not applied (sequence_mask, token_truncate).
    """
    trainer = make_vllm_trainer(
        tmp_path,
        model=str(model_dir),
        use_sampling_logps=False,
        off_policy_mask_threshold=_MASK_THRESHOLD,
        beta=0.1,
        **VLLM_MODES[vllm_mode],
    )
    inputs = first_inputs(trainer)
    assert "sampling_per_token_logps" in inputs
    assert ("importance_sampling_ratio" in inputs) == (vllm_mode != "correction-off")
    assert _dropped_rows(trainer, inputs) > 0
    _, ess_grad = _loss_and_grad(trainer, trainer._compute_loss, inputs)
    _, ref_grad = _loss_and_grad(trainer, _grpo_loss(trainer), inputs)
    torch.testing.assert_close(ess_grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert trainer._metrics["train"]["ess/mean"][-1] == pytest.approx(1.0, abs=1e-5)


def test_default_path_keeps_trl_mask_and_kl(tmp_path, model_dir):
    """use_sampling_logps=True (default) on vLLM-style inputs: the ESS term uses the sampler's
    log-probs, but the off-policy mask and the bias-corrected KL are TRL's, on TRL's log-probs:
    the mask GRPOTrainer computes (sampler log-probs) and the KL's contribution to the gradient
    (difference between beta = 0.1 and beta = 0) equal GRPOTrainer's.

    Mutations that fail it: the mask from old_per_token_logps; the KL weight
    exp(logp - logp_old) with the sampler's log-probs (today's main before the fix).
    """
    trainer = make_vllm_trainer(
        tmp_path, model=str(model_dir), off_policy_mask_threshold=_MASK_THRESHOLD, beta=0.1
    )
    inputs = first_inputs(trainer)
    assert _dropped_rows(trainer, inputs) > 0
    inputs = _shifted_reference(inputs)
    masks: list[torch.Tensor] = []

    def recording_mask(*args, **kwargs):
        masks.append(GRPOTrainer.get_off_policy_mask(*args, **kwargs))
        return masks[-1]

    trainer.get_off_policy_mask = recording_mask
    grads = {}
    for beta in (0.1, 0.0):
        trainer.beta = beta
        for name, fn in (("ess", trainer._compute_loss), ("trl", _grpo_loss(trainer))):
            grads[name, beta] = _loss_and_grad(trainer, fn, inputs)[1]
    assert len(masks) == 4
    for mask in masks[1:]:
        torch.testing.assert_close(mask.float(), masks[0].float())  # TRL's mask is int
    kl_ess, kl_trl = (grads[name, 0.1] - grads[name, 0.0] for name in ("ess", "trl"))
    assert kl_trl.abs().max() > 0
    torch.testing.assert_close(kl_ess, kl_trl, rtol=1e-4, atol=1e-7)
    kl_logged = trainer._metrics["train"]["kl"]
    assert kl_logged[0] == pytest.approx(kl_logged[1], rel=1e-5)  # ours, then TRL's
    assert trainer._metrics["train"]["ess/mean"][0] < 0.99  # the ESS term does see the sampler


def test_logged_ess_metrics_are_the_core_diagnostics(tmp_path, monkeypatch):
    """One loss call on off-policy inputs (stand-in sampler): every ``ess/*`` key holds the
    diagnostic the core returned for that call (one process: the gather is the identity), and
    ``ess/capped_mass`` / ``ess/ratio_min`` equal a float64 formula independent of the core.
    Mutations that fail it: ``ess/ratio_min`` mapped to ``ratio_max``; ``ess/capped_mass`` to
    ``capped_frac``."""
    import ess_po.integrations.trl.trainer as trl_adapter

    calls = []
    core = trl_adapter.ess_policy_loss

    def recording_loss(logp_new, logp_old, advantages, mask, **kwargs):
        calls.append(
            (
                logp_new.detach(),
                logp_old,
                mask,
                core(logp_new, logp_old, advantages, mask, **kwargs),
            )
        )
        return calls[-1][-1]

    monkeypatch.setattr(trl_adapter, "ess_policy_loss", recording_loss)
    trainer = make_vllm_trainer(tmp_path, noise=0.5)
    trainer._compute_loss(trainer.model, first_inputs(trainer))
    (logp_new, logp_old, mask, out), logs = calls[0], trainer._metrics["train"]
    for key, field in (
        ("ess/mean", "ess"),
        ("ess/min", "ess_min"),
        ("ess/capped_frac", "capped_frac"),
        ("ess/capped_mass", "capped_mass"),
        ("ess/kl_behavior", "kl_behavior"),
        ("ess/ratio_mean", "ratio_mean"),
        ("ess/ratio_max", "ratio_max"),
        ("ess/ratio_min", "ratio_min"),
        ("ess/regularizer_loss", "regularizer_loss"),
    ):
        assert logs[key] == [pytest.approx(float(getattr(out, field)), rel=1e-6)], key
    valid = mask.bool()
    w = (logp_new.double() - logp_old.double()).exp()[valid]
    rho = w.clamp(max=float(w.sum() ** 2 / (w.numel() * (w**2).sum())))
    mass = float((w - rho).sum() / w.sum())
    assert 0 < mass < 1 and float(w.min()) < 1
    assert logs["ess/capped_mass"][0] == pytest.approx(mass, rel=1e-4)
    assert logs["ess/ratio_min"][0] == pytest.approx(float(w.min()), rel=1e-4)


def test_sampling_logps_are_the_behaviour_policy(tmp_path):
    """Default path: logp_old is the sampler's log-probs (NaN tokens: TRL's old_per_token_logps),
    TRL's importance-sampling ratio is not applied on top."""
    trainer = make_vllm_trainer(tmp_path, nan_at=(1,))
    inputs = first_inputs(trainer)
    sampling, old = inputs["sampling_per_token_logps"], inputs["old_per_token_logps"]
    mask = inputs["completion_mask"].float()
    assert torch.isnan(sampling[:, 1][mask[:, 1] > 0]).all()  # vLLM's None -> NaN, by TRL
    loss = trainer._compute_loss(trainer.model, inputs)
    logp = _current_logps(trainer, inputs)
    expected = ess_policy_loss(
        logp,
        torch.where(torch.isnan(sampling), old, sampling),
        inputs["advantages"],
        mask,
        normalizer=inputs["num_items_in_batch"].float(),
    )
    torch.testing.assert_close(loss.detach(), expected.loss, rtol=1e-5, atol=1e-6)
    ess = trainer._metrics["train"]["ess/mean"][-1]
    assert ess == pytest.approx(float(expected.ess), rel=1e-5)
    assert ess < 0.99  # the sampler/trainer mismatch shows in ESS
    # the importance-sampling ratio is ignored: changing it does not change the loss
    inputs = {**inputs, "importance_sampling_ratio": inputs["importance_sampling_ratio"] * 0.1}
    torch.testing.assert_close(trainer._compute_loss(trainer.model, inputs).detach(), loss.detach())


@pytest.mark.slow
def test_multimodal_inputs_reach_the_model_as_in_grpo_trainer(tmp_path):
    """Multimodal fields in the inputs (pixel_values, image_grid_thw, token_type_ids, ...) go to
    TRL's log-prob helper exactly as GRPOTrainer._compute_loss passes them: same keyword
    arguments, same tensors. (The helper is called for real, without those fields, since the
    tiny model is text-only; a tiny vision-language model end to end is not covered.)
    Mutation checked: dropping one key from MODEL_INPUT_KEYS fails it."""
    from ess_po.integrations.trl.trainer import MODEL_INPUT_KEYS

    trainer = make_trainer(tmp_path)
    inputs = dict(first_inputs(trainer))
    b = inputs["completion_ids"].size(0)
    fields = {key: torch.full((b, 3), float(i)) for i, key in enumerate(MODEL_INPUT_KEYS)}
    inputs.update(fields)
    calls: list[dict] = []
    helper = trainer._get_per_token_logps_and_entropies

    def recording_helper(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        calls.append(kwargs)
        text_only = {k: v for k, v in kwargs.items() if k not in MODEL_INPUT_KEYS}
        return helper(model, input_ids, attention_mask, logits_to_keep, **text_only)

    trainer._get_per_token_logps_and_entropies = recording_helper
    trainer._compute_loss(trainer.model, inputs)
    GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    ours, trls = calls
    assert ours.keys() == trls.keys()
    for key, value in trls.items():
        assert ours[key] is value, key
    assert all(trls[key] is value for key, value in fields.items())


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
    with pytest.raises(ValueError, match="ess_scope must be one of"):
        make_trainer(tmp_path, ess_scope="token")


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
def test_train_bf16_model_with_sampler_logps(tmp_path, monkeypatch):
    """bf16 weights, TRL's bf16=True on CPU, vLLM-style sampler log-probs and a reused batch:
    trains, every ESS metric finite. TRL 1.16 returns float32 log-probs from a bf16 model (its
    log-prob helper computes them in float32), so the core sees float32 on both sides here; bf16
    beside float32 is the core's own test."""
    import ess_po.integrations.trl.trainer as trl_adapter
    from ess_po.testing.tiny import build_tiny_model, build_tiny_tokenizer

    dtypes = set()
    core = trl_adapter.ess_policy_loss

    def recording_loss(logp_new, logp_old, *args, **kwargs):
        dtypes.add((logp_new.dtype, logp_old.dtype))
        return core(logp_new, logp_old, *args, **kwargs)

    monkeypatch.setattr(trl_adapter, "ess_policy_loss", recording_loss)
    model = build_tiny_model(build_tiny_tokenizer()).to(torch.bfloat16)
    trainer = make_vllm_trainer(tmp_path, model=model, bf16=True, num_iterations=2, max_steps=2)
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    before = _params(trainer.model)
    trainer.train()
    _assert_trained(trainer, before)
    assert dtypes == {(torch.float32, torch.float32)}
    ess = logged(trainer, "ess/mean")
    assert ess[0] < 0.99 and ess[1] < 0.99  # sampler mismatch, then drift too


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        {},  # default: sampler log-probs are logp_old; TRL's ratio is computed but not applied
        {"use_sampling_logps": False, "vllm_importance_sampling_mode": "token_truncate"},
    ],
    ids=["default", "trl-ratio-token-truncate"],
)
def test_train_vllm_style_with_off_policy_mask(tmp_path, config):
    """TRL's vLLM path end to end (stand-in engine), reused batches, off_policy_mask_threshold:
    trains, the mask drops sequences during training, ESS metrics finite."""
    trainer = make_vllm_trainer(
        tmp_path,
        num_iterations=2,
        max_steps=2,
        off_policy_mask_threshold=_MASK_THRESHOLD,
        **config,
    )
    dropped = []

    def recording_mask(*args, **kwargs):
        keep = GRPOTrainer.get_off_policy_mask(*args, **kwargs)
        dropped.append(int((keep == 0).sum()))
        return keep

    trainer.get_off_policy_mask = recording_mask
    before = _params(trainer.model)
    trainer.train()
    _assert_trained(trainer, before)
    assert trainer.vllm_generation.syncs >= 1  # TRL synced weights to the engine
    assert sum(dropped) > 0
    assert logged(trainer, "sampling/importance_sampling_ratio/mean")  # TRL's own diagnostics


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
    """2 CPU ranks (gloo, torchrun), one ESS per loss call (``ess_scope="call"``; the step
    scope's 2-rank test is in test_trl_step_window.py): ESS is global (identical on both
    ranks) while each rank's local diagnostics differ; metrics are gathered into the logs
    (``ess/ratio_min``: the minimum over ranks; mutation "ess/ratio_min reduced by the mean"
    fails).

    Launch: torchrun's standalone rendezvous on a port the OS picks, on 127.0.0.1, with the
    parent's distributed variables removed; the workers leave through a barrier."""
    ranks = run_two_processes(tmp_path)
    ess0, ess1 = (torch.tensor(r["ess"]) for r in ranks)
    assert len(ess0) == len(ess1) >= 4, (ess0, ess1)
    torch.testing.assert_close(ess0, ess1)  # one ESS for the whole data-parallel batch
    assert ess0.min() < 1 - 1e-4, ess0  # the off-policy iteration
    assert ranks[0]["kl_behavior"] != ranks[1]["kl_behavior"]  # different local data
    assert ranks[0]["logged_ess"] and all(math.isfinite(v) for v in ranks[0]["logged_ess"])
    # ess/ratio_min is the minimum over processes (one loss call per logged step here)
    assert ranks[0]["ratio_min"] != ranks[1]["ratio_min"]
    lowest = [min(a, b) for a, b in zip(ranks[0]["ratio_min"], ranks[1]["ratio_min"], strict=True)]
    assert ranks[0]["logged_ratio_min"] == pytest.approx(lowest, rel=1e-6)
    assert ranks[0]["params_changed"] and ranks[1]["params_changed"]


@pytest.mark.slow
def test_demo_script_writes_metrics_and_plot(tmp_path):
    path = Path(__file__).parents[2] / "examples" / "train_tiny_grpo.py"
    spec = importlib.util.spec_from_file_location("train_tiny_grpo", path)
    train_tiny_grpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tiny_grpo)

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
