"""ESSGRPOTrainer through TRL's tool-calling path: an environment that owns the reward
(``environment_factory`` with ``get_reward``, ``reward_funcs=None``), real tool calls parsed and
executed by TRL, and TRL's tool mask on the tool-result tokens.

The model is built in code to call the tool: a one-layer Qwen2 whose embeddings are one-hot and
whose attention/MLP outputs are scaled near zero, so its next token follows a bigram table in
``lm_head`` (logit 0.6 * sqrt(128) = 6.8 for the next token of
``<tool_call>{"name": "peek", "arguments": {}}</tool_call><|im_end|>`` after the assistant
header, 0 for the others: it usually calls the tool, and its log-probs are not saturated). The tokenizer is character-level plus Qwen's special tokens, with
TRL's own Qwen3 chat template (TRL recognises it and sets the response parser).
"""

from __future__ import annotations

import itertools
import math
import string

import pytest
import torch

pytest.importorskip("trl")

import transformers
from packaging.version import Version

if Version(transformers.__version__) < Version("5.13.0.dev0"):
    # TRL parses tool calls with transformers' legacy response schema, which needs jmespath
    pytest.importorskip("jmespath", reason="TRL tool calling on transformers < 5.13 needs jmespath")

from trl import GRPOTrainer
from trl_helpers import BASE_CONFIG, first_inputs, flat_grad, logged

from ess_po.integrations.trl import ESSGRPOConfig, ESSGRPOTrainer

CALL = '{"name": "peek", "arguments": {}}'


def build_tool_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl.chat_template_utils import qwen3_chat_template

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(special + sorted(set(string.printable)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>", padding_side="left"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    added = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>"]
    added += ["</think>", CALL]  # the whole call is one token, so a bigram table can write it
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tok.chat_template = qwen3_chat_template
    return tok


def build_tool_calling_model(tok):
    from transformers import AutoModelForCausalLM, Qwen2Config

    vocab, hidden = len(tok), 128
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    chain = ["\n", "<tool_call>", CALL, "</tool_call>", "<|im_end|>"]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        for layer in model.model.layers:  # small, not zero: every weight still gets a gradient
            layer.self_attn.o_proj.weight.mul_(0.01)
            layer.mlp.down_proj.weight.mul_(0.01)
        table = torch.zeros(vocab, hidden)
        for current, following in itertools.pairwise(chain):
            table[tok.convert_tokens_to_ids(following), tok.convert_tokens_to_ids(current)] = 0.6
        model.lm_head.weight.copy_(table)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


class PeekEnv:
    """Owns the reward: ``peek`` reveals a number (0, 1, 2 in turn), ``get_reward`` returns it."""

    calls = 0

    def __init__(self) -> None:
        self.value = 0.0

    def reset(self, **kwargs) -> None:
        self.value = 0.0

    def peek(self) -> str:
        """Look at the hidden number.

        Returns:
            The hidden number.
        """
        PeekEnv.calls += 1
        self.value = float(PeekEnv.calls % 3)
        return str(int(self.value))

    def get_reward(self) -> float:
        return self.value


def make_tool_trainer(output_dir, **config):
    from datasets import Dataset

    PeekEnv.calls = 0
    tok = build_tool_tokenizer()
    args = ESSGRPOConfig(
        output_dir=str(output_dir),
        **{**BASE_CONFIG, "max_completion_length": 64, "max_tool_calling_iterations": 1, **config},
    )
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "go"}]] * 32})
    # reward_funcs=None: the environment's get_reward is the only reward source
    return ESSGRPOTrainer(
        build_tool_calling_model(tok),
        None,
        args,
        dataset,
        processing_class=tok,
        environment_factory=PeekEnv,
    )


@pytest.mark.slow
def test_environment_reward_and_tool_mask_equal_grpo_trainer(tmp_path):
    """Tool results are masked out of the loss exactly as in GRPOTrainer: the gradient on TRL's
    inputs (tool_mask with zeros on the tool-response tokens) equals GRPOTrainer._compute_loss's.
    Mutation checked: dropping ``* inputs["tool_mask"]`` from the adapter's mask fails it."""
    trainer = make_tool_trainer(tmp_path)
    inputs = first_inputs(trainer)
    metrics = trainer._metrics["train"]
    assert metrics["tools/call_frequency"][-1] > 0
    assert metrics["rewards/PeekEnv/std"][-1] > 0  # the environment's reward varies
    tool_mask = inputs["tool_mask"] * inputs["completion_mask"]
    assert (tool_mask == 0).any() and (tool_mask == 1).any()
    assert inputs["advantages"].abs().sum() > 0

    grads = []
    for fn in (trainer._compute_loss, lambda m, x: GRPOTrainer._compute_loss(trainer, m, x)):
        trainer.model.zero_grad(set_to_none=True)
        fn(trainer.model, inputs).backward()
        grads.append(flat_grad(trainer.model))
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert metrics["ess/mean"][-1] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_train_with_environment_tools(tmp_path):
    trainer = make_tool_trainer(tmp_path, max_steps=2, num_iterations=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    after = list(trainer.model.parameters())
    assert any(not torch.equal(b, a.detach()) for b, a in zip(before, after, strict=True))
    ess = logged(trainer, "ess/mean")
    assert ess[0] == pytest.approx(1.0, abs=1e-5) and ess[1] < 1.0  # reuse is off-policy
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))
    assert logged(trainer, "rewards/PeekEnv/mean")
    assert logged(trainer, "tools/call_frequency")[0] > 0
