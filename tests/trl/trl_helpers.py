"""Shared builders for the TRL adapter tests: a tiny offline model, tokenizer, task and trainer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

from ess_po.testing.processes import run_ranks
from ess_po.testing.tiny import (
    build_task_dataset,
    build_tiny_model,
    build_tiny_tokenizer,
    copy_reward,
)

__all__ = [
    "BASE_CONFIG",
    "StandInVLLM",
    "first_inputs",
    "flat_grad",
    "logged",
    "make_trainer",
    "make_vllm_trainer",
    "run_two_processes",
]

BASE_CONFIG: dict[str, Any] = {
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "max_completion_length": 5,
    "max_steps": 2,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "report_to": [],
    "use_cpu": True,
    "save_strategy": "no",
    "seed": 0,
    "disable_tqdm": True,
    "beta": 0.0,
    "lr_scheduler_type": "constant",
    "bf16": False,  # GRPOConfig defaults to bf16 autocast (also on CPU); tests opt in explicitly
}


def make_trainer(
    output_dir: Path,
    trainer_cls: type | None = None,
    *,
    model: Any = None,
    n_prompts: int = 64,
    eval_dataset: bool = False,
    trainer_kwargs: dict[str, Any] | None = None,
    **config: Any,
) -> Any:
    """An ESSGRPOTrainer (or ``trainer_cls``) on the tiny successor task. ``model`` may be a path.

    ``config`` goes to ``ESSGRPOConfig`` (``GRPOConfig`` for another ``trainer_cls``).
    """
    from trl import GRPOConfig

    from ess_po.integrations.trl import ESSGRPOConfig, ESSGRPOTrainer

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    if model is None:
        model = build_tiny_model(tok)
    cls = trainer_cls or ESSGRPOTrainer
    config_cls = ESSGRPOConfig if issubclass(cls, ESSGRPOTrainer) else GRPOConfig
    args = config_cls(output_dir=str(output_dir), **{**BASE_CONFIG, **config})
    return cls(
        model=model,
        reward_funcs=copy_reward,
        args=args,
        train_dataset=build_task_dataset(n_prompts, seed=0),
        eval_dataset=build_task_dataset(8, seed=1) if eval_dataset else None,
        processing_class=tok,
        **(trainer_kwargs or {}),
    )


def first_inputs(trainer: Any) -> dict[str, Any]:
    """Generate and score one training micro-batch, as the training loop would."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def logged(trainer: Any, key: str) -> list[float]:
    """Values of ``key`` in the trainer's log history, one per logging step that has it."""
    return [h[key] for h in trainer.state.log_history if key in h]


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
            for p in model.parameters()
            if p.requires_grad
        ]
    )


class StandInVLLM:
    """Plays vLLM's part in TRL's generation path (``VLLMGeneration`` in colocate mode) on CPU.

    TRL calls ``generate(prompts, images, num_generations, profiler)`` and ``sync_weights()``.
    Completions are sampled by TRL's own transformers path with the current weights; the reported
    per-token log-probabilities are the policy's own plus N(0, ``noise``²) per token, a recorded
    stand-in for an inference engine whose numerics differ from the trainer's. Positions in
    ``nan_at`` (column indices) are reported as ``None``, as vLLM does for unscorable tokens.
    Everything downstream (old log-probs, TRL's importance-sampling ratio and its modes, masks,
    the loss) is TRL's real code.
    """

    def __init__(self, trainer: Any, *, noise: float = 0.3, seed: int = 0, nan_at=()):
        self.trainer, self.noise, self.nan_at = trainer, noise, tuple(nan_at)
        self.generator = torch.Generator().manual_seed(seed)
        self.syncs = 0

    def sync_weights(self) -> None:
        self.syncs += 1

    @torch.no_grad()
    def generate(self, prompts, images, num_generations, profiler=None):
        t = self.trainer
        t.use_vllm = False  # TRL's transformers generation path samples the completions
        try:
            completion_ids, _ = t._generate_single_turn(prompts, images, {}, num_generations)
        finally:
            t.use_vllm = True
        # TRL's layout: prompts left-padded, completions right-padded
        pad = t.processing_class.pad_token_id
        p_max, c_max = max(map(len, prompts)), max(map(len, completion_ids))
        ids = torch.full((len(prompts), p_max + c_max), pad)
        attn = torch.zeros_like(ids)
        for i, (p, c) in enumerate(zip(prompts, completion_ids, strict=True)):
            ids[i, p_max - len(p) : p_max + len(c)] = torch.tensor(p + c)
            attn[i, p_max - len(p) : p_max + len(c)] = 1
        logp, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, attn, c_max)
        logp = logp + self.noise * torch.randn(logp.shape, generator=self.generator)
        logprobs = [
            [[None] if j in self.nan_at else [logp[i, j].item()] for j in range(len(c))]
            for i, c in enumerate(completion_ids)
        ]
        return prompts, completion_ids, logprobs, None


def make_vllm_trainer(output_dir: Path, *, noise: float = 0.3, nan_at=(), **kwargs: Any) -> Any:
    """``make_trainer`` with generation routed through :class:`StandInVLLM` (``use_vllm`` on)."""
    trainer = make_trainer(output_dir, **kwargs)
    trainer.use_vllm = True
    trainer._last_loaded_step = -1
    trainer.vllm_generation = StandInVLLM(trainer, noise=noise, nan_at=nan_at)
    return trainer


def run_two_processes(tmp_path: Path, *worker_args: str) -> list[dict]:
    """Run trl_ddp_worker.py (beside this file) on 2 gloo ranks; return each rank's JSON record."""
    run_ranks(Path(__file__).with_name("trl_ddp_worker.py"), 2, [tmp_path, *worker_args])
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
