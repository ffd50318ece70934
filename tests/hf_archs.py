"""Tiny Hugging Face models of every architecture structured pruning handles, built from configs (no downloads):
2 layers, hidden size 64, vocabulary 100, eval mode, with their example keyword inputs."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from tests.hf_models import tiny_hf

transformers = pytest.importorskip("transformers")

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)


def _ids(offset: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (2, 16)) + offset


def _mask() -> torch.Tensor:
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    return mask


def _sizes(**changes: Any) -> dict[str, Any]:
    """``SIZES`` with ``changes``; a value of None drops that key."""
    return {k: v for k, v in {**SIZES, **changes}.items() if v is not None}


def _falcon(heads: int = 4, **kw: Any) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    cfg = transformers.FalconConfig(**_sizes(intermediate_size=None, num_attention_heads=heads), ffn_hidden_size=128,
                                    alibi=False, **kw)
    return transformers.FalconModel(cfg), {"input_ids": _ids()}


_BUILDERS: dict[str, Callable[[], tuple[torch.nn.Module, dict[str, torch.Tensor]]]] = {
    "bert": lambda: tiny_hf("bert"),
    "roberta": lambda: (transformers.RobertaModel(transformers.RobertaConfig(**_sizes(vocab_size=104), pad_token_id=1)),
                        {"input_ids": _ids(2), "attention_mask": _mask()}),
    "vit": lambda: tiny_hf("vit"),
    "gpt2": lambda: tiny_hf("gpt2"),
    "phi3": lambda: (transformers.Phi3Model(transformers.Phi3Config(**_sizes(num_attention_heads=8),
                                                                    num_key_value_heads=4, pad_token_id=0)),
                     {"input_ids": _ids()}),
    "mixtral": lambda: (transformers.MixtralModel(transformers.MixtralConfig(
        **SIZES, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)), {"input_ids": _ids()}),
    "qwen2_moe": lambda: (transformers.Qwen2MoeModel(transformers.Qwen2MoeConfig(
        **SIZES, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=128)), {"input_ids": _ids()}),
    "gpt_oss": lambda: (transformers.GptOssModel(transformers.GptOssConfig(
        **_sizes(intermediate_size=64), num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])), {"input_ids": _ids()}),
    "opt": lambda: (transformers.OPTModel(transformers.OPTConfig(
        **_sizes(intermediate_size=None), ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64)),
        {"input_ids": _ids(), "attention_mask": _mask()}),
    "deberta_v2": lambda: (transformers.DebertaV2Model(transformers.DebertaV2Config(
        **SIZES, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=32)),
        {"input_ids": _ids(), "attention_mask": _mask()}),
    "t5": lambda: (transformers.T5Model(transformers.T5Config(
        d_model=64, d_ff=128, num_heads=4, d_kv=16, num_layers=2, vocab_size=100, decoder_start_token_id=0)),
        {"input_ids": _ids(), "decoder_input_ids": _ids()[:, :8]}),
    "wav2vec2": lambda: (transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(
        **_sizes(vocab_size=None), conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)), {"input_values": torch.randn(2, 800)}),
    "clip_text": lambda: (transformers.CLIPTextModel(transformers.CLIPTextConfig(**SIZES, max_position_embeddings=32)),
                          {"input_ids": _ids()}),
    "gpt_neox": lambda: (transformers.GPTNeoXModel(transformers.GPTNeoXConfig(**SIZES, max_position_embeddings=64)),
                         {"input_ids": _ids()}),
    "falcon": lambda: _falcon(8, new_decoder_architecture=True, num_kv_heads=4),
    "falcon_mq": lambda: _falcon(multi_query=True),
    "falcon_rw": lambda: _falcon(multi_query=False, new_decoder_architecture=False),
    "bloom": lambda: (transformers.BloomModel(transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4,
                                                                       vocab_size=100)),
                      {"input_ids": _ids(), "attention_mask": _mask()}),
}
ARCHS = tuple(_BUILDERS)


def tiny_arch(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``name`` in ``ARCHS``: an eval-mode model (seeded) and its example kwargs."""
    torch.manual_seed(0)
    model, kwargs = _BUILDERS[name]()
    return model.eval(), kwargs
