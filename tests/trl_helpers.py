"""Shared builders for the TRL adapter tests: a tiny offline model, tokenizer, task and trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from ess_po.integrations.tiny import (
    build_task_dataset,
    build_tiny_model,
    build_tiny_tokenizer,
    copy_reward,
)

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


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Save the tiny model + tokenizer so TRL can load it (and a reference copy) by path."""
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, seed=seed).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


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
    """An ESSGRPOTrainer (or ``trainer_cls``) on the tiny successor task. ``model`` may be a path."""
    from ess_po.integrations.trl import ESSGRPOTrainer
    from trl import GRPOConfig

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    if model is None:
        model = build_tiny_model(tok)
    args = GRPOConfig(output_dir=str(output_dir), **{**BASE_CONFIG, **config})
    cls = trainer_cls or ESSGRPOTrainer
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
