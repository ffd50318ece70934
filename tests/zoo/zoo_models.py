"""The zoo: tiny Hugging Face architectures built from configs (no download), their example inputs and the output
to check, in one registry shared by tests/zoo/test_zoo.py and benchmarks/support_matrix.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from dsx.models import randomize_batchnorm

try:
    import transformers as tf
except ImportError:  # tests skip the zoo without transformers; the support matrix needs it
    tf = None

VOCAB = 100
HIDDEN = 64
INNER = 128
LAYERS = 2
HEADS = 4
BATCH, SEQ = 2, 16
IMAGE = 32

Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Arch:
    """One architecture: ``build()`` returns an eval-mode model and its example keyword inputs; ``output`` is the
    key of the model output the steps check (a tensor that varies with the input)."""

    name: str
    family: str
    build: Callable[[], tuple[nn.Module, Inputs]]
    output: str


def _ids(seq: int = SEQ, vocab: int = VOCAB, low: int = 3) -> torch.Tensor:
    return torch.randint(low, vocab, (BATCH, seq))


def _text(mask: bool = True, left: bool = False, **extra: torch.Tensor) -> Inputs:
    """Token ids with an attention mask whose second row is padded: on the right, or for a decoder (``left``, as
    ``generate()`` wants) on the left."""
    inputs = {"input_ids": _ids()}
    if mask:
        inputs["attention_mask"] = torch.ones(BATCH, SEQ, dtype=torch.long)
        inputs["attention_mask"][1, slice(0, 4) if left else slice(SEQ - 4, SEQ)] = 0
    return {**inputs, **extra}


def _pixels(size: int = IMAGE, channels: int = 3) -> Inputs:
    return {"pixel_values": torch.randn(BATCH, channels, size, size)}


def _bert_like(cls: str, cfg: str, **kw: Any) -> Callable[[], tuple[nn.Module, Inputs]]:
    """A text encoder ``cls`` from ``cfg`` with the zoo's sizes (BERT naming) and padded ids."""
    def build() -> tuple[nn.Module, Inputs]:
        config = getattr(tf, cfg)(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=INNER, max_position_embeddings=64,
                                  **kw)
        return getattr(tf, cls)(config).eval(), _text()
    return build


def _decoder(cls: str, cfg: str, **kw: Any) -> Callable[[], tuple[nn.Module, Inputs]]:
    """A causal LM ``cls`` from ``cfg`` (Llama naming) with the zoo's sizes; ``kw`` overrides or adds fields."""
    def build() -> tuple[nn.Module, Inputs]:
        fields = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=2, intermediate_size=INNER, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
        fields.update(kw)
        return getattr(tf, cls)(getattr(tf, cfg)(**fields)).eval(), _text(left=True)
    return build


def _gpt2() -> tuple[nn.Module, Inputs]:
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tf.GPT2LMHeadModel(cfg).eval(), _text(left=True)


def _gpt_bigcode() -> tuple[nn.Module, Inputs]:
    cfg = tf.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                              multi_query=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tf.GPTBigCodeForCausalLM(cfg).eval(), _text(left=True)


def _falcon() -> tuple[nn.Module, Inputs]:
    cfg = tf.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          multi_query=True, parallel_attn=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tf.FalconForCausalLM(cfg).eval(), _text(left=True)


def _bloom() -> tuple[nn.Module, Inputs]:
    cfg = tf.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tf.BloomForCausalLM(cfg).eval(), _text(left=True)


def _opt() -> tuple[nn.Module, Inputs]:
    cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       ffn_dim=INNER, word_embed_proj_dim=HIDDEN, max_position_embeddings=64,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tf.OPTForCausalLM(cfg).eval(), _text(left=True)


def _gpt_neox() -> tuple[nn.Module, Inputs]:
    cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=INNER, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    return tf.GPTNeoXForCausalLM(cfg).eval(), _text(left=True)


def _seq2seq_text() -> Inputs:
    return _text(decoder_input_ids=_ids(seq=8))


def _t5() -> tuple[nn.Module, Inputs]:
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INNER, num_layers=LAYERS,
                      num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return tf.T5ForConditionalGeneration(cfg).eval(), _seq2seq_text()


def _bart() -> tuple[nn.Module, Inputs]:
    cfg = tf.BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=INNER,
                        decoder_ffn_dim=INNER, max_position_embeddings=64)
    return tf.BartForConditionalGeneration(cfg).eval(), _seq2seq_text()


MELS, FRAMES = 16, 32


def _whisper_config() -> Any:
    return tf.WhisperConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=INNER,
                            decoder_ffn_dim=INNER, num_mel_bins=MELS, max_source_positions=FRAMES // 2,
                            max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None)


def _whisper() -> tuple[nn.Module, Inputs]:
    inputs = {"input_features": torch.randn(BATCH, MELS, FRAMES), "decoder_input_ids": _ids(seq=8)}
    return tf.WhisperForConditionalGeneration(_whisper_config()).eval(), inputs


def _whisper_encoder() -> tuple[nn.Module, Inputs]:
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    return WhisperEncoder(_whisper_config()).eval(), {"input_features": torch.randn(BATCH, MELS, FRAMES)}


def _wav2vec2() -> tuple[nn.Module, Inputs]:
    cfg = tf.Wav2Vec2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=INNER, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    return tf.Wav2Vec2Model(cfg).eval(), {"input_values": torch.randn(BATCH, 400)}


def _vit_like(cls: str, cfg: str, **kw: Any) -> Callable[[], tuple[nn.Module, Inputs]]:
    """A ViT-style image encoder with 8x8 patches of a 32x32 image."""
    def build() -> tuple[nn.Module, Inputs]:
        config = getattr(tf, cfg)(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=INNER, image_size=IMAGE, patch_size=8, **kw)
        return getattr(tf, cls)(config).eval(), _pixels()
    return build


def _swin() -> tuple[nn.Module, Inputs]:
    cfg = tf.SwinConfig(image_size=IMAGE, patch_size=2, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4)
    return tf.SwinModel(cfg).eval(), _pixels()


def _convnext() -> tuple[nn.Module, Inputs]:
    cfg = tf.ConvNextConfig(num_stages=2, hidden_sizes=[32, 64], depths=[1, 1], num_labels=10)
    return tf.ConvNextForImageClassification(cfg).eval(), _pixels()


def _regnet() -> tuple[nn.Module, Inputs]:
    cfg = tf.RegNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], groups_width=16, num_labels=10)
    return randomize_batchnorm(tf.RegNetForImageClassification(cfg)).eval(), _pixels()


def _resnet() -> tuple[nn.Module, Inputs]:
    cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck",
                          num_labels=10)
    return randomize_batchnorm(tf.ResNetForImageClassification(cfg)).eval(), _pixels()


def _efficientnet() -> tuple[nn.Module, Inputs]:
    cfg = tf.EfficientNetConfig(image_size=IMAGE, width_coefficient=0.25, depth_coefficient=1.0, kernel_sizes=[3, 3, 5],
                                in_channels=[32, 16, 24], out_channels=[16, 24, 40], strides=[1, 2, 2],
                                num_block_repeats=[1, 1, 1], expand_ratios=[1, 6, 6], hidden_dim=320, num_labels=10)
    return randomize_batchnorm(tf.EfficientNetForImageClassification(cfg)).eval(), _pixels()


def _detr() -> tuple[nn.Module, Inputs]:
    backbone = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], out_features=["stage2"])
    cfg = tf.DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                        d_model=HIDDEN, encoder_layers=1, decoder_layers=1, encoder_attention_heads=HEADS,
                        decoder_attention_heads=HEADS, encoder_ffn_dim=INNER, decoder_ffn_dim=INNER, num_queries=8,
                        num_labels=10)
    return randomize_batchnorm(tf.DetrForObjectDetection(cfg)).eval(), _pixels()


def _clip_text() -> tuple[nn.Module, Inputs]:
    cfg = tf.CLIPTextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=INNER, max_position_embeddings=SEQ, bos_token_id=1, eos_token_id=2)
    return tf.CLIPTextModel(cfg).eval(), _text()


def _siglip_text() -> tuple[nn.Module, Inputs]:
    cfg = tf.SiglipTextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, intermediate_size=INNER, max_position_embeddings=SEQ,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tf.SiglipTextModel(cfg).eval(), _text(mask=False)


def _clip() -> tuple[nn.Module, Inputs]:
    text = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=INNER, max_position_embeddings=SEQ, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INNER,
                  image_size=IMAGE, patch_size=8)
    cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    return tf.CLIPModel(cfg).eval(), {**_text(), **_pixels()}


ARCHS: list[Arch] = [
    # text encoders
    Arch("bert", "text encoder", _bert_like("BertModel", "BertConfig"), "last_hidden_state"),
    Arch("roberta", "text encoder", _bert_like("RobertaModel", "RobertaConfig", pad_token_id=1), "last_hidden_state"),
    Arch("albert", "text encoder", _bert_like("AlbertModel", "AlbertConfig", embedding_size=32), "last_hidden_state"),
    Arch("electra", "text encoder", _bert_like("ElectraModel", "ElectraConfig", embedding_size=32),
         "last_hidden_state"),
    Arch("deberta-v2", "text encoder", _bert_like("DebertaV2Model", "DebertaV2Config", relative_attention=True,
                                                  position_buckets=8, pos_att_type=["p2c", "c2p"]),
         "last_hidden_state"),
    Arch("distilbert", "text encoder", lambda: (tf.DistilBertModel(tf.DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INNER,
        max_position_embeddings=64)).eval(), _text()), "last_hidden_state"),
    # decoders
    Arch("gpt2", "decoder", _gpt2, "logits"),
    Arch("gpt-neox", "decoder", _gpt_neox, "logits"),
    Arch("llama", "decoder", _decoder("LlamaForCausalLM", "LlamaConfig"), "logits"),
    Arch("mistral", "decoder", _decoder("MistralForCausalLM", "MistralConfig", sliding_window=8), "logits"),
    Arch("phi3", "decoder", _decoder("Phi3ForCausalLM", "Phi3Config"), "logits"),
    Arch("gemma", "decoder", _decoder("GemmaForCausalLM", "GemmaConfig", head_dim=HIDDEN // HEADS), "logits"),
    Arch("qwen2", "decoder", _decoder("Qwen2ForCausalLM", "Qwen2Config"), "logits"),
    Arch("falcon", "decoder", _falcon, "logits"),
    Arch("bloom", "decoder", _bloom, "logits"),
    Arch("opt", "decoder", _opt, "logits"),
    Arch("gpt-bigcode", "decoder", _gpt_bigcode, "logits"),
    Arch("mixtral", "decoder", _decoder("MixtralForCausalLM", "MixtralConfig", num_local_experts=4,
                                        num_experts_per_tok=2), "logits"),
    # encoder-decoders
    Arch("t5", "encoder-decoder", _t5, "logits"),
    Arch("bart", "encoder-decoder", _bart, "logits"),
    Arch("whisper", "encoder-decoder", _whisper, "logits"),
    # vision
    Arch("vit", "vision", _vit_like("ViTModel", "ViTConfig"), "last_hidden_state"),
    Arch("deit", "vision", _vit_like("DeiTModel", "DeiTConfig"), "last_hidden_state"),
    Arch("swin", "vision", _swin, "last_hidden_state"),
    Arch("convnext", "vision", _convnext, "logits"),
    Arch("regnet", "vision", _regnet, "logits"),
    Arch("resnet", "vision", _resnet, "logits"),
    Arch("efficientnet", "vision", _efficientnet, "logits"),
    Arch("detr", "vision", _detr, "logits"),
    # audio
    Arch("wav2vec2", "audio", _wav2vec2, "last_hidden_state"),
    Arch("whisper-encoder", "audio", _whisper_encoder, "last_hidden_state"),
    # multimodal towers
    Arch("clip-text", "multimodal", _clip_text, "last_hidden_state"),
    Arch("clip-vision", "multimodal", _vit_like("CLIPVisionModel", "CLIPVisionConfig"), "last_hidden_state"),
    Arch("siglip-text", "multimodal", _siglip_text, "last_hidden_state"),
    Arch("siglip-vision", "multimodal", _vit_like("SiglipVisionModel", "SiglipVisionConfig"), "last_hidden_state"),
    Arch("clip", "multimodal", _clip, "logits_per_image"),
]
BY_NAME = {a.name: a for a in ARCHS}


def build(name: str) -> tuple[nn.Module, Inputs]:
    """A fresh eval-mode instance of architecture ``name`` and its example inputs (seeded: the same every call)."""
    torch.manual_seed(0)
    return BY_NAME[name].build()


def pick(arch: Arch, outputs: Any) -> torch.Tensor:
    """The output tensor the zoo checks for ``arch``."""
    return outputs[arch.output] if isinstance(outputs, dict) else getattr(outputs, arch.output)
