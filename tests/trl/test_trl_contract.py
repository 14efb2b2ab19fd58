"""Contract with the installed TRL: the hooks ESSGRPOTrainer overrides or calls, their signatures,
and the inputs keys it reads. A TRL upgrade that changes any of them fails here, loudly."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

trl = pytest.importorskip("trl")

from packaging.version import Version  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from ess_po.integrations.trl import ESSGRPOTrainer  # noqa: E402
from ess_po.integrations.trl.trainer import MODEL_INPUT_KEYS  # noqa: E402


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_trl_version_in_supported_range():
    assert Version("1.16") <= Version(trl.__version__) < Version("1.17")


def test_overridden_hook_signature():
    assert _params(GRPOTrainer._compute_loss) == ["self", "model", "inputs"]
    assert _params(ESSGRPOTrainer._compute_loss) == ["self", "model", "inputs"]
    # the only method of GRPOTrainer we override is the loss hook
    overridden = {
        name
        for name, value in vars(ESSGRPOTrainer).items()
        if callable(value) and hasattr(GRPOTrainer, name) and not name.startswith("__")
    }
    assert overridden == {"_compute_loss"}


def test_compute_loss_routes_to_the_hook():
    """compute_loss must call self._compute_loss (and not a Liger/fused loss that bypasses it)."""
    source = inspect.getsource(GRPOTrainer.compute_loss)
    assert "self._compute_loss(model, inputs)" in source
    assert "liger" not in source.lower()


def test_loss_is_scaled_for_gradient_accumulation():
    # our normalisers fold gradient accumulation in, exactly like TRL's
    assert GRPOTrainer.loss_is_scaled_for_ga is True


def test_logprob_helper_signature():
    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    for name in (
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "compute_entropy",
        "compute_aux_loss",
    ):
        assert name in params, name
    missing = [key for key in MODEL_INPUT_KEYS if key not in params]
    assert not missing, f"TRL no longer accepts {missing}"
    # and TRL's own _compute_loss forwards exactly these inputs keys (plus the text ones)
    source = inspect.getsource(GRPOTrainer._compute_loss)
    forwarded = {key for key in MODEL_INPUT_KEYS if f'inputs.get("{key}")' in source}
    assert forwarded == set(MODEL_INPUT_KEYS)


def test_mask_helpers_signatures():
    assert _params(GRPOTrainer.get_high_entropy_mask) == ["self", "entropies", "mask", "threshold"]
    assert isinstance(inspect.getattr_static(GRPOTrainer, "get_off_policy_mask"), staticmethod)
    assert _params(GRPOTrainer.get_off_policy_mask) == [
        "advantages",
        "per_token_logps",
        "sampling_per_token_logps",
        "mask",
        "off_policy_threshold",
    ]
    from trl.trainer.utils import nanmax, nanmin

    assert callable(nanmin) and callable(nanmax)


INPUT_KEYS_READ = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "advantages",
    "num_items_in_batch",
    "old_per_token_logps",
    "ref_per_token_logps",
    "sampling_per_token_logps",
    "importance_sampling_ratio",
    "tool_mask",
)


def test_inputs_keys_are_produced_by_trl():
    """Every key we read is one TRL's generation step writes (vLLM-only keys included)."""
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for key in INPUT_KEYS_READ:
        assert f'"{key}"' in source, key


def test_inputs_keys_at_runtime(tmp_path):
    from trl_helpers import first_inputs, make_trainer

    from ess_po.testing.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    trainer = make_trainer(tmp_path, model=str(model_dir), beta=0.1, num_iterations=2)
    inputs = first_inputs(trainer)
    for key in INPUT_KEYS_READ[:8]:
        assert key in inputs, key
    assert inputs["advantages"].dim() == 1
    assert inputs["old_per_token_logps"].shape == inputs["completion_ids"].shape
    assert inputs["num_items_in_batch"].dim() == 0


def test_trainer_attributes_we_read(tmp_path):
    from trl_helpers import make_trainer

    trainer = make_trainer(tmp_path)
    for name in (
        "loss_type",
        "beta",
        "temperature",
        "top_entropy_quantile",
        "off_policy_mask_threshold",
        "entropy_coef",
        "aux_loss_enabled",
        "router_aux_loss_coef",
        "max_completion_length",
        "use_vllm",
        "vllm_importance_sampling_correction",
        "_metrics",
    ):
        assert hasattr(trainer, name), name


def test_grpo_config_fields_we_read():
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    defaults = {
        "loss_type": "dapo",  # our default normalisation relies on this being TRL's default
        "epsilon": 0.2,  # we warn only when it differs from the default
        "epsilon_high": None,
        "delta": None,
        "importance_sampling_level": "token",
        "use_adaptive_entropy": False,
        "use_liger_kernel": False,
        "use_bias_correction_kl": True,
        "top_entropy_quantile": 1.0,
        "off_policy_mask_threshold": None,
        "entropy_coef": 0.0,
        "mask_truncated_completions": False,
        "vllm_importance_sampling_correction": True,
    }
    for name, default in defaults.items():
        assert name in fields, name
        assert fields[name].default == default, name
    for name in ("steps_per_generation", "num_iterations", "beta"):
        assert name in fields, name


# ---------------------------------------------------------------------------------------------
# ESSGRPOTrainer's constructor is GRPOTrainer's (issue: reward_funcs was required and everything
# after `args` keyword-only). Mutation checked: restoring that signature fails all three tests.
# ---------------------------------------------------------------------------------------------


def test_init_signature_is_grpo_trainers():
    assert inspect.signature(ESSGRPOTrainer.__init__) == inspect.signature(GRPOTrainer.__init__)
    assert inspect.signature(ESSGRPOTrainer) == inspect.signature(GRPOTrainer)
    reward = inspect.signature(GRPOTrainer.__init__).parameters["reward_funcs"]
    assert reward.default is None  # rewards may come from an environment (test_trl_tools.py)


def test_positional_arguments_as_grpo_trainer(tmp_path):
    """model, reward_funcs, args, train_dataset, eval_dataset, processing_class by position."""
    from trl_helpers import BASE_CONFIG

    from ess_po.testing.tiny import (
        build_task_dataset,
        build_tiny_model,
        build_tiny_tokenizer,
        copy_reward,
    )

    tok = build_tiny_tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path), **BASE_CONFIG)
    dataset = build_task_dataset(16)
    trainer = ESSGRPOTrainer(build_tiny_model(tok), copy_reward, args, dataset, None, tok)
    assert trainer.args is args and trainer.train_dataset is dataset
    assert trainer.processing_class is tok
    assert trainer.ess_scope == "step" and trainer.use_sampling_logps  # ESSGRPOConfig defaults
    # no reward source: TRL's own error, not a TypeError about a missing argument
    with pytest.raises(ValueError, match="No reward source provided"):
        ESSGRPOTrainer(build_tiny_model(tok), None, args, dataset, processing_class=tok)
    # an unknown argument: the TypeError GRPOTrainer raises
    with pytest.raises(TypeError, match="unexpected keyword argument 'ess_scope'"):
        ESSGRPOTrainer(build_tiny_model(tok), copy_reward, args, ess_scope="step")


def test_ess_config_extends_grpo_config(tmp_path):
    from ess_po.integrations.trl import ESSGRPOConfig

    grpo = {f.name for f in dataclasses.fields(GRPOConfig)}
    ours = {f.name: f.default for f in dataclasses.fields(ESSGRPOConfig) if f.name not in grpo}
    assert ours == {
        "ess_scope": "step",
        "use_sampling_logps": True,
        "ess_window": None,  # deprecated
        "ess_check_values": False,
    }
    config = ESSGRPOConfig(
        output_dir=str(tmp_path), ess_scope="sequence", report_to=[], use_cpu=True
    )
    assert isinstance(config, GRPOConfig) and config.to_dict()["ess_scope"] == "sequence"
    with pytest.raises(ValueError, match="ess_scope must be one of"):
        ESSGRPOConfig(output_dir=str(tmp_path), ess_scope="token", report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="ess_window must be one of"):
        ESSGRPOConfig(output_dir=str(tmp_path), ess_window="epoch", report_to=[], use_cpu=True)
    common = {"output_dir": str(tmp_path), "report_to": [], "use_cpu": True}
    # a split where the step's micro-batches are not all generated before its first backward is
    # accepted at config time (as GRPOConfig accepts it); the trainer falls back to "call"
    split = {"gradient_accumulation_steps": 2, "steps_per_generation": 1}
    assert ESSGRPOConfig(**common, **split).ess_scope == "step"
    # TRL's default steps_per_generation (None -> gradient_accumulation_steps) passes
    assert ESSGRPOConfig(**common, gradient_accumulation_steps=4).steps_per_generation == 4


# (old spelling, new ess_scope): a FutureWarning naming the replacement
_DEPRECATED = [
    ({"ess_window": "micro_batch"}, "call", "ess_scope='call'"),
    ({"ess_window": "step"}, "step", "ess_scope='step'"),
    ({"ess_scope": "batch"}, "step", "ess_scope='step'"),
    ({"ess_scope": "batch", "ess_window": "micro_batch"}, "call", "ess_scope='call'"),
    ({"ess_scope": "sequence", "ess_window": "micro_batch"}, "sequence", "ess_scope='call'"),
]


@pytest.mark.parametrize(("old", "scope", "named"), _DEPRECATED)
def test_old_spellings_warn_and_map(tmp_path, old, scope, named):
    from ess_po.integrations.trl import ESSGRPOConfig

    with pytest.warns(FutureWarning, match="deprecated") as record:
        config = ESSGRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **old)
    assert any(named in str(w.message) for w in record), [str(w.message) for w in record]
    assert config.ess_scope == scope and config.ess_window is None
    # the same on a plain GRPOConfig carrying the old attributes
    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    for name, value in old.items():
        setattr(args, name, value)
    from ess_po.integrations.trl.config import validate_args

    with pytest.warns(FutureWarning, match="deprecated"):
        assert validate_args(args) == scope


def test_contradicting_old_and_new_spellings_raise(tmp_path):
    from ess_po.integrations.trl import ESSGRPOConfig

    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="contradict"):
        ESSGRPOConfig(
            output_dir=str(tmp_path),
            report_to=[],
            use_cpu=True,
            ess_scope="call",
            ess_window="step",
        )


def test_plain_grpo_config_falls_back_to_one_ess_per_call(tmp_path):
    """A plain GRPOConfig gives ESSGRPOConfig's defaults, the step scope's fallback included."""
    from trl_helpers import BASE_CONFIG

    from ess_po.testing.tiny import (
        build_task_dataset,
        build_tiny_model,
        build_tiny_tokenizer,
        copy_reward,
    )

    config = {**BASE_CONFIG, "gradient_accumulation_steps": 2, "steps_per_generation": 1}
    args = GRPOConfig(output_dir=str(tmp_path), **config)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    with pytest.warns(UserWarning, match="steps_per_generation \\(1\\) is not a multiple") as rec:
        trainer = ESSGRPOTrainer(model, copy_reward, args, build_task_dataset(16), None, tok)
    assert "ess_scope='call'" in str(rec[0].message)
    assert trainer.ess_scope == "call"


# ---------------------------------------------------------------------------------------------
# TRL private state the step scope reads (no public hook exposes a step's buffered micro-batches):
# GRPOTrainer._buffered_inputs (the generation batch split into steps_per_generation micro-batches)
# and GRPOTrainer._step (micro-batches trained so far). A TRL change to either fails here.
# ---------------------------------------------------------------------------------------------


def test_private_step_state_we_read(tmp_path):
    prepare = inspect.getsource(GRPOTrainer._prepare_inputs)
    assert "self._buffered_inputs[self._step % self.args.steps_per_generation]" in prepare
    assert "generate_every = self.args.steps_per_generation * self.num_iterations" in prepare
    assert "self._step % generate_every == 0" in prepare
    assert "split_tensor_dict(generation_batch, self.args.steps_per_generation)" in prepare
    step = inspect.getsource(GRPOTrainer.training_step)
    assert "self._step += 1" in step
    assert step.index("super().training_step(") < step.index("self._step += 1")  # after the loss

    from trl_helpers import first_inputs, make_trainer

    trainer = make_trainer(tmp_path, per_device_train_batch_size=4, steps_per_generation=2)
    assert trainer._step == 0 and trainer._buffered_inputs is None
    inputs = first_inputs(trainer)
    assert isinstance(trainer._buffered_inputs, list) and len(trainer._buffered_inputs) == 2
    assert trainer._buffered_inputs[0] is inputs


def test_readme_trl_example_is_the_docs_one():
    """The README's TRL example is the block the docs tests run (docs/trl.md, not skipped)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("\n## TRL\n") :]
    block = section[section.index("```python\n") + 10 : section.index("\n```", 10) + 1]
    assert "use_cpu=True" in block
    guide = (root / "docs" / "trl.md").read_text()
    at = guide.index(block)
    assert "skip:" not in guide[:at].rstrip().rsplit("\n", 2)[-1]
