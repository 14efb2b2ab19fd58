"""Tiny offline building blocks shared by the TRL tests, the demo and the benchmarks.

Everything here is built from code: a character-level tokenizer, a small causal LM
(Qwen2 or Llama config, hidden size ~64) and a synthetic task with a verifiable reward.
Nothing is downloaded.

The tasks: the prompt is a short random string over a small alphabet followed by ``=``, e.g.
``"cab="``. ``successor`` (pattern completion, the default) asks to continue the alphabet after
the last character (``"cde"``); ``copy`` asks to repeat the string (``"cab"``). The completion
should stop with EOS. The reward is the fraction of positions the completion gets right (a dense,
verifiable signal in ``[0, 1]``), so a tiny model trained with RL shows a rising reward within a
few dozen steps.

Requires the ``trl`` extra (transformers, tokenizers, datasets); importing this module without
them raises an ``ImportError`` that says so. It ships inside the package (rather than under
``tests/``) because the demo, the benchmarks and the TRL guide's runnable example use it from an
installed ess-po too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Fail on import, naming the extra, rather than with a bare ModuleNotFoundError on first use.
# find_spec looks the packages up without importing them (transformers takes seconds).
_MISSING = [name for name in ("transformers", "tokenizers", "datasets") if find_spec(name) is None]
if _MISSING:
    raise ImportError(
        f"ess_po.testing.tiny needs {', '.join(_MISSING)}, which come with the `trl` extra: "
        'pip install -e ".[trl]" in a checkout of ess-po (pip install "ess-po[trl]" once released).'
    )

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "DEFAULT_ALPHABET",
    "TASKS",
    "build_task_dataset",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "copy_reward",
    "warm_start",
]

DEFAULT_ALPHABET = "abcde"
"""Characters of the synthetic prompts and answers (the tokenizer adds ``=``, space and specials)."""
PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"
SEPARATOR = "="


def build_tiny_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per character) with ``<pad>``, ``<eos>``, ``<bos>``.

    Decoding concatenates characters without spaces; ``<bos>`` is not added to prompts.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(alphabet + SEPARATOR + " "))
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, BOS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS, padding_side="left"
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 64,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM (``arch`` in ``{"qwen2", "llama"}``) sized for CPU tests."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}.get(arch)
    if config_cls is None:
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


TASKS = ("successor", "copy")
"""Names accepted by :func:`build_task_dataset`'s ``task``."""


def _target(task: str, s: str, alphabet: str, answer_len: int) -> str:
    if task == "copy":
        return s
    if task == "successor":  # continue the alphabet (cyclically) after the last prompt character
        start = alphabet.index(s[-1])
        return "".join(alphabet[(start + k) % len(alphabet)] for k in range(1, answer_len + 1))
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def build_task_dataset(
    n: int = 256,
    *,
    task: str = "successor",
    alphabet: str = DEFAULT_ALPHABET,
    min_len: int = 2,
    max_len: int = 4,
    answer_len: int = 3,
    seed: int = 0,
) -> Dataset:
    """Prompts ``"<s>="`` with a random string ``s`` over ``alphabet``; column ``answer`` holds the target.

    ``task="successor"`` (pattern completion): continue the alphabet after the last character of
    ``s`` for ``answer_len`` characters, e.g. ``"cab=" -> "cde"``. ``task="copy"``: repeat ``s``.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(n):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))
        prompts.append(s + SEPARATOR)
        answers.append(_target(task, s, alphabet, answer_len))
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def _completion_text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational format: [{"role": ..., "content": ...}]
        return "".join(m.get("content", "") for m in completion)
    return str(completion)


def copy_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """Fraction of target positions reproduced, with a penalty for extra characters.

    ``reward = (#i: c[i] == a[i]) / max(len(a), len(c))`` in ``[0, 1]``; 1 only for an exact copy.
    Signature follows TRL's reward-function convention (extra dataset columns arrive as kwargs).
    """
    rewards = []
    for completion, target in zip(completions, answer, strict=True):
        text = _completion_text(completion).replace(EOS, "").replace(PAD, "").strip()
        hits = sum(a == b for a, b in zip(text, target, strict=False))
        rewards.append(hits / max(len(target), len(text), 1))
    return rewards


def warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    dataset: Dataset,
    *,
    steps: int = 30,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    text_fn: Callable[[dict[str, Any]], tuple[str, str]] | None = None,
) -> list[float]:
    """A short supervised warm start (cross-entropy on the completion tokens only).

    Deliberately brief: it gives the random model the output format so that RL has a
    non-zero reward to climb, without solving the task. Returns the loss per step.
    """
    import torch

    text_fn = text_fn or (lambda row: (row["prompt"], row["answer"]))
    rows = [text_fn(r) for r in dataset]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses: list[float] = []
    for _ in range(steps):
        batch = rng.sample(rows, min(batch_size, len(rows)))
        ids, labels = [], []
        for prompt, answer in batch:
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
        label_t = torch.full((len(ids), width), -100)
        attn = torch.zeros((len(ids), width), dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
            input_ids[i, : len(x)] = torch.tensor(x)
            label_t[i, : len(y)] = torch.tensor(y)
            attn[i, : len(x)] = 1
        loss = model(input_ids=input_ids, attention_mask=attn, labels=label_t).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def save_tiny_model(directory: str | Path, *, seed: int = 0, **model_kwargs: Any) -> Path:
    """Save :func:`build_tiny_model` (``model_kwargs`` passed on) and its tokenizer to ``directory``
    so that a trainer can load them by path; returns ``directory`` as a ``Path``."""
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, seed=seed, **model_kwargs).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
