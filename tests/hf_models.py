"""Tiny Hugging Face models built from configs (no downloads) and their example inputs, shared by tests."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def tiny_hf(name: str, *, attn: str = "eager") -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``name`` in bert / gpt2 / llama / vit: an eval-mode model with 2 layers and its example kwargs."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    if name == "bert":
        cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=100, attn_implementation=attn)
        return transformers.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": mask}
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, attn_implementation=attn)
        return transformers.GPT2Model(cfg).eval(), {"input_ids": ids, "attention_mask": mask}
    if name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                       attn_implementation=attn)
        return transformers.LlamaModel(cfg).eval(), {"input_ids": ids}
    if name == "vit":
        cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, image_size=32, patch_size=8, attn_implementation=attn)
        return transformers.ViTModel(cfg).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}
    raise ValueError(f"unknown tiny model {name!r}")
