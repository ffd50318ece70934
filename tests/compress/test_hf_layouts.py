"""Structured pruning of fused projections (Phi-3, GPT-NeoX, Falcon, Bloom), MoE experts (Mixtral, Qwen2-MoE,
GPT-OSS), DeBERTa-v2, T5 and q/k/v/out attention (ViT, OPT, CLIP, Wav2Vec2): each removes the requested share of its
prunable linear weights, keeps its outputs' shapes, and removing units equals zeroing what they add to the output.

Prunable linear weights: the weights of the ``nn.Linear`` / ``Conv1D`` layers and the 3-D MoE expert tensors inside
the transformer blocks (under an ``nn.ModuleList``), not embeddings or heads, without the layers an architecture
cannot prune (``UNPRUNABLE``).
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import dsx
from dsx.compress.depgraph import tensor_leaves
from dsx.compress.hf_layouts import ALIBI, EXPERT_MULTIPLE, ROUTER, LayerConfig
from dsx.compress.structured import prune_structured
from dsx.core.inputs import normalize_inputs
from tests.hf_archs import ARCHS, tiny_arch, transformers

UNPRUNABLE = {"bloom": ("self_attention",), "qwen2_moe": ("shared_expert_gate",)}
"""Linear weights that stay by design: ALiBi attention, the one-output gate of Qwen2-MoE's shared expert."""


def run(model, kwargs):
    with torch.no_grad():
        return tensor_leaves(model(**kwargs))


def linear_weights(model: nn.Module, exclude: tuple[str, ...] = ()) -> int:
    """The number of prunable linear weights of ``model`` (see the module docstring)."""
    blocks = [f"{n}." for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    total = 0
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        linear = name.endswith(".weight") and (isinstance(owner, nn.Linear) or type(owner).__name__ == "Conv1D")
        expert = p.dim() == 3 and ".experts." in name
        if (linear or expert) and any(name.startswith(b) for b in blocks) and not any(e in name for e in exclude):
            total += p.numel()
    return total


@pytest.mark.parametrize("name", ARCHS)
def test_removes_the_requested_share_of_the_prunable_linear_weights(name):
    model, kwargs = tiny_arch(name)
    before, weights = run(model, kwargs), linear_weights(model, UNPRUNABLE.get(name, ()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned, info = prune_structured(model, 0.3, normalize_inputs(kwargs))
    removed = 1 - linear_weights(pruned, UNPRUNABLE.get(name, ())) / weights
    assert abs(removed - 0.3) <= 0.05, (name, removed, info["skipped"])
    after = run(pruned, kwargs)
    assert [t.shape for t in after] == [t.shape for t in before]
    assert all(t.isfinite().all() for t in after if t.is_floating_point())
    short = [str(w.message) for w in caught if "short of amount" in str(w.message)]
    assert short == [] if name != "bloom" else len(short) == 1 and ALIBI in short[0], short


def consumer_dim(model: nn.Module, name: str) -> int | None:
    """The dim of parameter ``name`` that reads the channels of units: a linear layer's input, MoE experts'
    down_proj neurons; None for parameters that produce them."""
    owner = model.get_submodule(name.rpartition(".")[0])
    if name.endswith("experts.down_proj"):
        return 1 if getattr(owner, "is_transposed", False) else 2
    if name.endswith(".weight") and isinstance(owner, nn.Linear):
        return 1
    return 0 if name.endswith(".weight") and type(owner).__name__ == "Conv1D" else None


@pytest.mark.parametrize("name", ARCHS)
def test_removing_units_equals_zeroing_what_they_add(name):
    """With a plan the first units stay: the pruned model computes what the original does once the removed units'
    inputs to their consumers (output and down projections) are zero, which checks every layout."""
    model, kwargs = tiny_arch(name)
    _, info = prune_structured(copy.deepcopy(model), 0.3, normalize_inputs(kwargs))
    plan = {key: units // 2 for key, units in info["original"].items()}
    pruned, _ = prune_structured(copy.deepcopy(model), 0.0, normalize_inputs(kwargs), plan=plan)
    kept = dict(pruned.named_parameters())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            d = consumer_dim(model, pname)
            if d is not None and kept[pname].shape[d] < p.shape[d]:
                p.narrow(d, kept[pname].shape[d], p.shape[d] - kept[pname].shape[d]).zero_()
    torch.testing.assert_close(run(pruned, kwargs)[0], run(model, kwargs)[0], rtol=1e-4, atol=1e-5)


def test_phi3_layers_keep_their_own_head_counts():
    cfg = transformers.Phi3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                  intermediate_size=128, vocab_size=100, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    pruned, info = prune_structured(model, 0.0, normalize_inputs({"input_ids": ids}),
                                    plan={"model.layers.0.self_attn": 2, "model.layers.1.mlp": 96})
    first, second = pruned.model.layers[0], pruned.model.layers[1]
    assert info["attention"]["model.layers.0.self_attn"] == {"heads": 4, "kv_heads": 2}
    assert first.self_attn.qkv_proj.out_features == (4 + 2 * 2) * 8 and first.self_attn.num_key_value_heads == 2
    assert isinstance(first.self_attn.config, LayerConfig) and first.self_attn.config.num_attention_heads == 4
    assert second.self_attn.config is pruned.config and pruned.config.num_attention_heads == 8
    assert second.mlp.gate_up_proj.out_features == 2 * 96 and second.mlp.down_proj.in_features == 96
    pruned.set_attn_implementation("sdpa")  # the layer's own config reads through to the shared one
    assert first.self_attn.config._attn_implementation == "sdpa"
    copied = copy.deepcopy(pruned)
    assert copied.model.layers[0].self_attn.config.shared is copied.config
    assert pruned.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 11)


@pytest.mark.parametrize("name, heads, kv", [("falcon", 4, 2), ("falcon_mq", 2, 1), ("falcon_rw", 2, 2)])
def test_falcon_fused_qkv_variants(name, heads, kv):
    """Keeping 2 units: KV groups of 2 query heads (new decoder architecture), or heads (multi-query, Falcon-RW)."""
    model, kwargs = tiny_arch(name)
    pruned, info = prune_structured(model, 0.0, normalize_inputs(kwargs), plan={"h.0.self_attention": 2})
    attn = pruned.h[0].self_attention
    assert info["attention"]["h.0.self_attention"] == {"heads": heads, "kv_heads": kv}
    assert (attn.num_heads, attn.num_kv_heads, attn.num_key_value_groups) == (heads, kv, heads // kv)
    assert attn.query_key_value.out_features == (heads + 2 * kv) * attn.head_dim
    assert pruned.config.num_attention_heads == pruned.h[1].self_attention.num_heads  # the config keeps its count


def test_t5_heads_follow_the_position_bias_through_the_stack():
    model, kwargs = tiny_arch("t5")
    pruned, info = prune_structured(model, 0.0, normalize_inputs(kwargs),
                                    plan={"encoder.block.0.layer.0.SelfAttention": 3})
    for block in pruned.encoder.block:  # one group: the first layer's bias is passed on to the others
        assert block.layer[0].SelfAttention.n_heads == 3 and block.layer[0].SelfAttention.o.in_features == 48
    assert pruned.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape == (32, 3)
    assert pruned.decoder.block[1].layer[0].SelfAttention.n_heads == 4
    assert run(pruned, kwargs)[0].shape == (2, 8, 64)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_moe_experts_keep_aligned_widths_and_the_router(name):
    model, kwargs = tiny_arch(name)
    pruned, info = prune_structured(model, 0.3, normalize_inputs(kwargs))
    router = "router" if name == "gpt_oss" else "gate"
    for i, layer in enumerate(pruned.layers):
        key, experts = f"layers.{i}.mlp.experts", layer.mlp.experts
        assert info["plan"][key] % EXPERT_MULTIPLE == 0 and info["plan"][key] < info["original"][key]
        assert getattr(experts, "intermediate_dim", getattr(experts, "intermediate_size", None)) == info["plan"][key]
        assert getattr(layer.mlp, router).weight.shape == (4, 64)
        assert info["skipped"][f"layers.{i}.mlp.{router}"] == ROUTER
    if name == "mixtral":  # the config follows where one width holds for every layer
        widths = {layer.mlp.experts.intermediate_dim for layer in pruned.layers}
        assert pruned.config.intermediate_size == (widths.pop() if len(widths) == 1 else 128)


def test_prune_warns_when_layers_cannot_be_pruned():
    model, kwargs = tiny_arch("bloom")
    with pytest.warns(UserWarning, match="linear weights in the model's blocks.*h.0.self_attention.*ALiBi"):
        small = dsx.prune(model, 0.3, structured=True, example_inputs=kwargs)
    info = dsx.history(small)[-1]["info"]
    assert info["skipped"]["h.0.self_attention"] == ALIBI and info["linear_ratio"] < 0.25
    assert small.h[0].mlp.dense_h_to_4h.out_features < 256


def test_skipped_layers_do_not_count_as_short():
    model, kwargs = tiny_arch("phi3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = prune_structured(model, 0.3, normalize_inputs(kwargs), skip=["re:.*self_attn"])
    assert all(h == {"heads": 8, "kv_heads": 4} for h in info["attention"].values())
    assert abs(info["linear_ratio"] - 0.3) <= 0.05  # of the MLPs: attention was skipped on request
