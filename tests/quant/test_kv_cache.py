"""QuantizedCache (int8 / fp8 KV cache) through Hugging Face generate(), and the use_quantized_cache hook."""

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from transformers import (BertConfig, BertModel, DynamicCache, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PretrainedConfig)

from dsx.quant.kv_cache import QuantizedCache, QuantizedKVLayer, cache_bytes, use_quantized_cache  # noqa: E402

CACHE_KW = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"
GEN = dict(max_new_tokens=24, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
HAS_FP8 = hasattr(torch, "float8_e4m3fn")


def _llama(hidden: int = 64, **kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, initializer_range=0.05, **kw)
    return LlamaForCausalLM(config).eval()


def _ids(batch: int = 1, length: int = 12) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(1))


def _compare(model, cache, **extra) -> tuple[float, float, object]:
    """Greedy generate with a DynamicCache and with ``cache``: (max |score diff|, token agreement, the output)."""
    ids = extra.pop("ids", _ids())
    ref = model.generate(ids, **{CACHE_KW: DynamicCache(config=model.config)}, **GEN, **extra)
    out = model.generate(ids, **{CACHE_KW: cache}, **GEN, **extra)
    same = (ref.sequences == out.sequences).all(0)[ids.shape[1]:].tolist() + [False]
    steps = same.index(False) + 1  # up to and including the first differing token: later steps see other inputs
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ref.scores[:steps], out.scores[:steps]))
    return diff, (ref.sequences == out.sequences).float().mean().item(), out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_int8_generate_matches_dynamic_cache(attn):
    model = _llama(attn_implementation=attn)
    cache = QuantizedCache(model.config, "int8", residual_length=4)
    diff, agree, out = _compare(model, cache)
    assert 0 < diff < 0.01, diff  # > 0: older tokens really were read back from int8
    assert agree >= 0.9
    assert out.past_key_values is cache and cache.get_seq_length() == 12 + 24 - 1
    assert cache.layers[0].keys.shape[-2] < 4  # most tokens live in the quantized store


@pytest.mark.skipif(not HAS_FP8, reason="torch has no float8_e4m3fn")
def test_fp8_generate_runs_close():
    model = _llama()
    diff, agree, out = _compare(model, QuantizedCache(model.config, "fp8", residual_length=4))
    assert 0 < diff < 0.1, diff  # e4m3 keeps 3 mantissa bits: ~6% per value
    assert agree >= 0.6
    assert out.past_key_values.layers[0]._store[0].dtype == torch.float8_e4m3fn


def test_memory_ratio_at_512_tokens():
    model = _llama(hidden=256)  # head_dim 64
    ids = _ids(length=512)
    ref = model.generate(ids, **{CACHE_KW: DynamicCache(config=model.config)}, max_new_tokens=4, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    ours = QuantizedCache(model.config)  # residual_length=128
    out = model.generate(ids, **{CACHE_KW: ours}, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=0)
    assert out.sequences.shape == ref.sequences.shape
    ratio = cache_bytes(ours) / cache_bytes(ref.past_key_values)
    print(f"int8 KV cache bytes / fp32 DynamicCache bytes at 515 tokens: {ratio:.3f}")
    assert ours.nbytes == cache_bytes(ours)
    assert 0.2 < ratio < 0.6  # codes 1 B + scale 4 B per 64 values, against 4 B a value: ~0.27


def test_bf16_model_returns_bf16():
    model = _llama().to(torch.bfloat16)
    cache = QuantizedCache(model.config, residual_length=4)
    diff, agree, _ = _compare(model, cache)
    assert diff < 0.1 and agree >= 0.8
    keys, values = cache.update(torch.randn(1, 2, 1, 16, dtype=torch.bfloat16),
                                torch.randn(1, 2, 1, 16, dtype=torch.bfloat16), 0)
    assert keys.dtype == values.dtype == torch.bfloat16 and keys.shape == (1, 2, 12 + 24, 16)


def test_batch_with_left_padding():
    model = _llama()
    ids = _ids(batch=2)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    diff, agree, _ = _compare(model, QuantizedCache(model.config, residual_length=4), ids=ids, attention_mask=mask)
    assert 0 < diff < 0.01 and agree >= 0.9


def test_beam_search_reorders():
    model = _llama()
    diff, agree, _ = _compare(model, QuantizedCache(model.config, residual_length=4), num_beams=2)
    assert diff < 0.01 and agree >= 0.9


def test_layer_residual_flush_crop_and_reorder():
    x = torch.randn(2, 2, 12, 8) * torch.logspace(-2, 2, 12).view(1, 1, 12, 1)  # token scales 0.01 .. 100
    layer = QuantizedKVLayer("int8", residual_length=4)
    keys, _ = layer.update(x[:, :, :6], -x[:, :, :6])
    assert torch.equal(keys, x[:, :, :6]) and layer.keys.shape[-2] == 0  # 6 >= 4: flushed, returned exact
    for t in range(6, 9):
        keys, values = layer.update(x[:, :, t:t + 1], -x[:, :, t:t + 1])
    assert layer.keys.shape[-2] == 3 and torch.equal(keys[:, :, 6:], x[:, :, 6:9])  # residual stays exact
    bound = x[:, :, :6].abs().amax(-1, keepdim=True) / 254 * 1.001  # half an int8 step of each token's scale
    assert ((keys[:, :, :6] - x[:, :, :6]).abs() <= bound).all() and not torch.equal(keys[:, :, :6], x[:, :, :6])
    assert torch.equal(values, -keys)
    layer.crop(-2)  # inside the residual
    assert layer.get_seq_length() == 7 and layer.keys.shape[-2] == 1
    layer.crop(-3)  # into the quantized store
    keys2, _ = layer.update(x[:, :, 11:], -x[:, :, 11:])
    assert layer.get_seq_length() == 5 and torch.equal(keys2[:, :, :4], keys[:, :, :4])
    layer.reorder_cache(torch.tensor([1, 0]))
    keys3, _ = layer.update(x[:, :, :1], x[:, :, :1])
    assert torch.equal(keys3[:, :, :5], keys2.flip(0))


def test_gpt2_generate():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    diff, agree, _ = _compare(model, QuantizedCache(config, residual_length=4))
    assert 0 < diff < 0.01 and agree >= 0.9


def test_sliding_window_model_matches():
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, sliding_window=8)
    model = MistralForCausalLM(config).eval()
    diff, agree, _ = _compare(model, QuantizedCache(config, residual_length=4))
    assert 0 < diff < 0.01 and agree >= 0.9


def test_use_quantized_cache_hook_through_generate():
    model = _llama()
    ids = _ids()
    explicit = model.generate(ids, **{CACHE_KW: QuantizedCache(model.config, residual_length=4)}, **GEN)
    handle = use_quantized_cache(model, residual_length=4)
    assert model.dsx_kv_cache == "int8"
    seen = []
    spy = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get(CACHE_KW)), with_kwargs=True)
    out = model.generate(ids, **GEN)
    assert isinstance(seen[5], QuantizedCache) and all(c is seen[0] for c in seen) and len(seen) == 24
    assert seen[5].get_seq_length() == 12 + 24 - 1 and out.past_key_values is seen[0]
    assert torch.equal(out.sequences, explicit.sequences)
    assert isinstance(getattr(model(ids, use_cache=True), CACHE_KW), QuantizedCache)
    assert getattr(model(ids, use_cache=False), CACHE_KW) is None
    handle.remove()
    spy.remove()
    assert not hasattr(model, "dsx_kv_cache")
    assert type(model.generate(ids, **GEN).past_key_values) is DynamicCache


def test_bad_inputs():
    config = _llama().config
    with pytest.raises(ValueError, match=r"dtype.*int8.*fp8"):
        QuantizedCache(config, dtype="int4")
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="residual_length"):
            QuantizedCache(config, residual_length=bad)
    with pytest.raises(ValueError, match="attention layers/heads"):
        QuantizedCache(PretrainedConfig())
    with pytest.raises(ValueError, match="only"):
        QuantizedCache(LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"]))
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    for model in (bert, nn.Linear(4, 4)):
        with pytest.raises(ValueError, match="kv_cache: the model has no KV cache"):
            use_quantized_cache(model)
    llama = _llama()
    with pytest.raises(ValueError, match="dtype"):
        use_quantized_cache(llama, dtype="int2")
    assert not hasattr(llama, "dsx_kv_cache") and not llama._forward_pre_hooks
    with pytest.raises(TypeError, match="Cache"):
        cache_bytes(object())
