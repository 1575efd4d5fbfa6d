"""Tiny random models and a stub tokenizer for fast engine tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


class StubTokenizer:
    """Token ids as space-separated numbers; enough for the engine."""

    chat_template = None

    def __init__(self, eos_token_id=None):
        self.eos_token_id = eos_token_id

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)

    def __call__(self, text):
        class Enc:
            input_ids = [int(t) for t in text.split()]

        return Enc()


def tiny_model(kind: str = "llama", vocab: int = 97, seed: int = 0, attn: str = "sdpa", **kw):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    common.update(kw)
    # logits far enough apart that fp32 noise never decides a greedy tie
    common.setdefault("initializer_range", 0.2)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(kind)
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None
    return model.eval()


def hf_greedy(model, prompt, n, **kw):
    """Reference: HF generate, greedy, all-ones attention mask (no pad-token guessing)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kw
    )
    return out[0, len(prompt):].tolist()
