"""Structured pruning of Hugging Face BERT, GPT-2 and Llama (grouped-query attention): whole heads and MLP
neurons go, the hidden size stays, the attributes forward reads follow, and a plan replays exactly."""

import copy
import json

import numpy as np
import pytest
import torch

from dsx.compress.depgraph import build_depgraph
from dsx.core.inputs import tensor_leaves
from dsx.compress.hf import HeadSlice, head_layout, unit_input
from dsx.compress.hf_layouts import unit_layout
from dsx.compress.structured import prune_structured
from dsx.core.inputs import normalize_inputs
from tests.hf_models import tiny_hf


def run(model, kwargs):
    with torch.no_grad():
        return tensor_leaves(model(**kwargs))


@pytest.mark.parametrize("amount", [0.5, 0.3])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_prunes_heads_and_neurons_to_the_ratio_and_replays(name, amount):
    model, kwargs = tiny_hf(name)
    original = copy.deepcopy(model)
    before = run(original, kwargs)
    pruned, info = prune_structured(model, amount, normalize_inputs(kwargs))
    assert abs(info["ratio"] - amount) <= 0.05, info
    assert info["params_after"] < info["params_before"]
    json.dumps(info)
    after = run(pruned, kwargs)
    assert [t.shape for t in after] == [t.shape for t in before]
    assert all(t.isfinite().all() for t in after)
    assert len(info["attention"]) == 2 and all(h["heads"] < 4 for h in info["attention"].values())
    fresh, _ = prune_structured(copy.deepcopy(original), 0.0, normalize_inputs(kwargs), plan=info["plan"])
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(run(fresh, kwargs), after))


def test_hidden_size_stays_and_only_heads_and_mlp_groups_are_prunable():
    for name, heads, mlp in [("bert", "encoder.layer.0.attention.self", "encoder.layer.0.intermediate.dense"),
                             ("gpt2", "h.0.attn", "h.0.mlp.c_fc"),
                             ("llama", "layers.0.self_attn", "layers.0.mlp.gate_proj")]:
        model, kwargs = tiny_hf(name)
        groups = {g.key: g for g in build_depgraph(model, normalize_inputs(kwargs)).groups}
        prunable = {k for k, g in groups.items() if g.reason is None}
        assert {heads, mlp} <= prunable and len(prunable) == 4, (name, prunable)
        assert groups[heads].width == {"bert": 16, "gpt2": 48, "llama": 32}[name]  # positions per unit in its root
        assert groups[mlp].size == (256 if name == "gpt2" else 128)


def test_bert_attributes_follow_the_heads():
    model, kwargs = tiny_hf("bert")
    pruned, info = prune_structured(model, 0.5, normalize_inputs(kwargs))
    att = pruned.encoder.layer[0].attention
    assert att.self.num_attention_heads == info["attention"]["encoder.layer.0.attention.self"]["heads"] == 2
    assert att.self.all_head_size == att.self.query.out_features == att.output.dense.in_features == 32
    assert pruned.config.hidden_size == 64 and pruned.config.num_attention_heads == 4  # head size derives from it
    assert pruned.config.intermediate_size == pruned.encoder.layer[1].intermediate.dense.out_features == 64


def test_gpt2_fused_qkv_keeps_q_k_v_slices_consistent():
    model, kwargs = tiny_hf("gpt2")
    original = copy.deepcopy(model)
    pruned, info = prune_structured(model, 0.5, normalize_inputs(kwargs), plan={"h.0.attn": 2})
    attn = pruned.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf) == (2, 32, 96)
    assert attn.c_attn.weight.shape == (64, 96) and attn.c_proj.weight.shape == (32, 64)
    w = original.h[0].attn.c_attn.weight  # plan keeps heads 0 and 1: the first 32 columns of each of q, k, v
    assert torch.equal(attn.c_attn.weight, torch.cat([w[:, :32], w[:, 64:96], w[:, 128:160]], 1))
    assert torch.equal(attn.c_proj.weight, original.h[0].attn.c_proj.weight[:32])
    assert info["attention"]["h.1.attn"]["heads"] == 4 and pruned.h[1].attn.num_heads == 4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_gqa_prunes_whole_kv_groups(attn):
    model, kwargs = tiny_hf("llama", attn=attn)
    pruned, info = prune_structured(model, 0.5, normalize_inputs(kwargs))
    layer = pruned.layers[0].self_attn
    assert info["attention"]["layers.0.self_attn"] == {"heads": 2, "kv_heads": 1}
    assert (layer.q_proj.out_features, layer.k_proj.out_features, layer.o_proj.in_features) == (32, 16, 32)
    assert layer.num_key_value_groups == 2 and layer.head_dim == 16
    assert info["config"] == {"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    with torch.no_grad():
        out = pruned(**kwargs, use_cache=True)
    assert out.last_hidden_state.shape == (2, 16, 64) and out.past_key_values is not None


def test_per_layer_head_counts_may_differ():
    model, kwargs = tiny_hf("llama")
    pruned, info = prune_structured(model, 0.0, normalize_inputs(kwargs),
                                    plan={"layers.0.self_attn": 1, "layers.1.mlp.gate_proj": 100})
    assert [info["attention"][f"layers.{i}.self_attn"]["kv_heads"] for i in (0, 1)] == [1, 2]
    assert info["config"] == {}  # no single value holds for every layer
    assert pruned.layers[1].mlp.intermediate_size == 100 and pruned.layers[0].mlp.intermediate_size == 128
    assert run(pruned, kwargs)[0].shape == (2, 16, 64)


def test_skip_and_global_scope_on_a_transformer():
    model, kwargs = tiny_hf("bert")
    pruned, info = prune_structured(model, 0.3, normalize_inputs(kwargs), skip=["re:.*attention.*"],
                                    scope="global", importance="taylor")
    assert set(info["plan"]) == {"encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"}
    assert pruned.encoder.layer[0].attention.self.num_attention_heads == 4
    assert abs(info["ratio"] - 0.3) <= 0.05


def test_hidden_size_stays_when_the_output_does_not_show_it():
    """A causal LM returns only logits: the residual stream is still kept (attention reads it), tied head included."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=100, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    pruned, info = prune_structured(model, 0.5, normalize_inputs({"input_ids": ids}))
    assert "hidden size" in info["skipped"]["model.embed_tokens"] and abs(info["ratio"] - 0.5) <= 0.05
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight and pruned.lm_head.weight.shape == (100, 64)
    assert run(pruned, {"input_ids": ids})[0].shape == (2, 8, 100)


def test_head_slices_lay_out_sections_then_fixed_positions():
    units = np.array([7, 9])
    falcon_multi_query = HeadSlice("query_key_value", "weight", 0, (2,), fixed=3)  # q heads, then the one k and v
    assert falcon_multi_query.positions(units).tolist() == [7, 7, 9, 9, -1, -1, -1] and falcon_multi_query.size(2) == 7
    phi3 = HeadSlice("qkv_proj", "weight", 0, (2, 1, 1))  # [q | k | v], two query heads per KV head
    assert phi3.positions(units).tolist() == [7, 7, 9, 9, 7, 9, 7, 9]


class BiasedAttention(torch.nn.Module):
    """q/k/v/o attention with a per-head position bias table the layout does not name (as in Swin)."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(8, 8) for _ in range(4))
        self.head_dim, self.position_bias = 4, torch.nn.Embedding(9, 2)


def test_a_module_with_per_head_parameters_its_layout_leaves_out_is_not_a_unit():
    module = BiasedAttention()
    assert head_layout(module).fits(module) is False and unit_layout(module) is None
    module.position_bias = torch.nn.Embedding(9, 3)  # not the head count: shared by the heads, it may stay
    assert unit_layout(module).units == 2


def test_unit_inputs_read_the_input_the_kv_states_keywords_or_positions():
    x, enc, res = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert unit_input("q", (x, res), {}) is x and unit_input("kv", (x,), {}) is x
    assert unit_input("kv", (x,), {"key_value_states": enc}) is enc and unit_input(1, (x, res), {}) is res
    assert unit_input("rel_embeddings", (x,), {"rel_embeddings": enc}) is enc and unit_input(2, (x,), {}) is None
