import copy

import pytest
import torch
import torch.nn as nn

import dsx
from dsx.models import TinyGPT, TinyResNet, randomize_batchnorm
from tests.hf_models import tiny_hf

# Rewrite counts on the CPU default pass set (graph passes only); every model has 2 layers.
EXPECTED = {
    "bert": {"remove_dropout": 7, "attention_to_sdpa": 2},
    "gpt2": {"remove_dropout": 7, "attention_to_sdpa": 2},
    "llama": {"remove_dropout": 2, "attention_to_sdpa": 2},
    "vit": {"remove_dropout": 7, "attention_to_sdpa": 2},
    "resnet": {"fold_batch_norm": 9},
    "gpt": {"remove_dropout": 6, "attention_to_sdpa": 2},
}
# With passes="all" (the CUDA default) the kernel fusions fire as well.
KERNEL_FUSIONS = {
    "bert": {"add_layer_norm": 4, "bias_act": 2},
    "gpt2": {"add_layer_norm": 4, "bias_act": 2},
    "llama": {"add_rms_norm": 4, "rms_norm": 1, "gated_mlp": 2},
    "vit": {"add_layer_norm": 4, "bias_act": 2},
    "resnet": {},
    "gpt": {"add_layer_norm": 4, "bias_act": 2},
}


def build(name):
    torch.manual_seed(0)
    if name == "resnet":
        return randomize_batchnorm(TinyResNet(width=8)).eval(), (torch.randn(2, 3, 16, 16),)
    if name == "gpt":
        return TinyGPT(vocab=64, dim=32, layers=2, heads=4, max_len=16).eval(), (torch.randint(0, 64, (2, 16)),)
    return tiny_hf(name)


def first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def call(m, inputs):
    return m(**inputs) if isinstance(inputs, dict) else m(*inputs)


@pytest.mark.parametrize("passes", [None, "all"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_fuse_matches_eager_fires_expected_passes_and_leaves_model_alone(name, passes):
    model, inputs = build(name)
    before = copy.deepcopy(model.state_dict())
    opt = dsx.Fuse(passes)(model, inputs)
    fired = {k: v for k, v in dsx.fusions(opt).items() if v}
    assert fired == (EXPECTED[name] if passes is None else {**EXPECTED[name], **KERNEL_FUSIONS[name]})
    with torch.no_grad():
        ref, out = first(call(model, inputs)), first(call(opt, inputs))
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4
    assert opt._dsx_history[-1]["error"]["max_rel"] < 1e-4
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not isinstance(model, torch.fx.GraphModule)


def test_a_training_model_is_refused():
    model, inputs = build("gpt")
    with pytest.raises(ValueError, match="fuse: the model is in training mode"):
        dsx.Fuse()(model.train(), inputs)


def test_inplace_returns_a_fused_model():
    model, inputs = build("resnet")
    opt = dsx.Fuse(inplace=True)(model, inputs)
    assert dsx.fusions(opt)["fold_batch_norm"] == 9


def test_bad_input_errors_name_the_argument():
    model, inputs = build("resnet")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        dsx.Fuse()(lambda x: x, inputs)
    with pytest.raises(TypeError, match="example_inputs"):
        dsx.Fuse()(model, "an image")
    with pytest.raises(ValueError, match="example_inputs: the model raised"):
        dsx.Fuse()(model, torch.randn(2, 5, 16, 16))
    with pytest.raises(ValueError, match="unknown pass 'fuse_all'"):
        dsx.Fuse(["fuse_all"])
    with pytest.raises(ValueError, match="example_inputs are required"):
        dsx.Fuse()(model)


def test_verification_error_past_tolerance(monkeypatch):
    from dsx.graph import fuse as fuse_mod
    from dsx.graph.pass_manager import GraphPass

    def corrupt(gm):
        with torch.no_grad():
            next(gm.parameters()).add_(1.0)
        return 1

    model = nn.Sequential(nn.Linear(4, 4)).eval()
    bad = GraphPass("corrupt", corrupt)
    monkeypatch.setattr(fuse_mod, "resolve", lambda passes, device="cuda": [bad])
    with pytest.raises(dsx.VerificationError, match="fuse: outputs differ"):
        dsx.Fuse()(model, torch.randn(2, 4))


@pytest.mark.parametrize("name", ["gpt", "llama", "resnet"])
def test_dynamic_batch_serves_other_batch_sizes(name, tmp_path):
    model, inputs = build(name)
    opt = dsx.Fuse(dynamic_batch=True)(model, inputs)
    assert {k: v for k, v in dsx.fusions(opt).items() if v} == EXPECTED[name]
    if isinstance(inputs, dict):
        inputs = {**inputs, "use_cache": False}
    for batch in (1, 5):
        bigger = {k: v[:1].repeat(batch, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) else v
                  for k, v in inputs.items()} if isinstance(inputs, dict) else \
            tuple(v[:1].repeat(batch, *[1] * (v.dim() - 1)) for v in inputs)
        with torch.no_grad():
            out, ref = first(call(opt, {k: v for k, v in bigger.items() if k != "use_cache"}
                                  if isinstance(bigger, dict) else bigger)), first(call(model, bigger))
        assert out.shape[0] == batch
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    dsx.save(opt, tmp_path / "m")
    fresh, _ = build(name)
    again = dsx.load(fresh, tmp_path / "m")
    assert again._dsx_history[-1]["config"]["dynamic_batch"] is True


def test_dynamic_batch_needs_a_batch_of_two():
    model, _ = build("resnet")
    with pytest.raises(ValueError, match="dynamic_batch needs a batch size >= 2"):
        dsx.Fuse(dynamic_batch=True)(model, torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("name,fired", [
    ("llama", {"add_rms_norm": 4, "rms_norm": 1, "gated_mlp": 2}),
    ("gpt2", {"remove_dropout": 5, "add_layer_norm": 4, "bias_act": 2}),
])
def test_bf16_models_with_default_sdpa_attention(name, fired):
    model, kw = tiny_hf(name, attn="sdpa")
    model = model.to(torch.bfloat16)
    opt = dsx.Fuse("all")(model, kw)
    assert {k: v for k, v in dsx.fusions(opt).items() if v} == fired
    error = opt._dsx_history[-1]["error"]
    assert error["tolerance"] == 2e-2 and error["max_rel"] < 2e-2
