"""dsx op translations to ONNX: each op exported alone, run in onnxruntime and compared with the op on CPU."""

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from dsx.export.onnx_ops import translation_table  # noqa: E402

OPS = torch.ops.dsx


class Call(torch.nn.Module):
    """A module whose forward is ``fn``: the smallest graph around one dsx op."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()


def roundtrip(tmp_path, fn, args, *, opset=20, dynamic_shapes=None, run_args=None):
    """Export ``fn(*args)`` with the dsx translations, check the file, run it in onnxruntime on ``run_args``
    (default ``args``); return the outputs, PyTorch's outputs on the same inputs, and the ONNX op types."""
    module = Call(fn).eval()
    program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                                custom_translation_table=translation_table(opset), verbose=False)
    path = tmp_path / "op.onnx"
    program.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {""}, "custom-domain nodes left in the graph"
    run_args = args if run_args is None else run_args
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outs = session.run(None, dict(zip(names, (a.numpy() for a in run_args if isinstance(a, torch.Tensor)))))
    ref = module(*run_args)
    ref = list(ref) if isinstance(ref, tuple) else [ref]
    return [torch.from_numpy(o) for o in outs], ref, {n.op_type for n in graph.node}


def check(outs, refs, tol=1e-5):
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_err(out, ref) < tol


@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, False)])
def test_add_layer_norm_is_add_and_layer_normalization_with_both_outputs(tmp_path, weight, bias):
    x, r = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    params = [torch.randn(24) if weight else None, torch.randn(24) if bias else None]
    outs, refs, ops = roundtrip(tmp_path, lambda x, r: OPS.add_layer_norm(x, r, *params, 1e-5), (x, r))
    check(outs, refs)
    assert {"Add", "LayerNormalization"} <= ops


@pytest.mark.parametrize("weight", [True, False])
def test_add_rms_norm_matches_llama_numerics(tmp_path, weight):
    x, r = torch.randn(3, 7, 33), torch.randn(3, 7, 33)
    w = torch.randn(33) if weight else None
    outs, refs, ops = roundtrip(tmp_path, lambda x, r: OPS.add_rms_norm(x, r, w, 1e-6), (x, r))
    check(outs, refs)
    assert {"Add", "ReduceMean", "Sqrt"} <= ops


@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm(tmp_path, weight):
    x = torch.randn(4, 65) * 3
    w = torch.randn(65) if weight else None
    outs, refs, _ = roundtrip(tmp_path, lambda x: OPS.rms_norm(x, w, 1e-5), (x,))
    check(outs, refs)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu"])
@pytest.mark.parametrize("opset", [18, 20])
def test_bias_act_every_activation_in_both_gelu_spellings(tmp_path, act, opset):
    x, b = torch.randn(2, 6, 40) * 3, torch.randn(40)
    outs, refs, ops = roundtrip(tmp_path, lambda x, b: OPS.bias_act(x, b, act), (x, b), opset=opset)
    check(outs, refs)
    if act.startswith("gelu"):
        assert ("Gelu" if opset >= 20 else "Erf" if act == "gelu" else "Tanh") in ops


def test_bias_act_without_bias(tmp_path):
    x = torch.randn(5, 17)
    outs, refs, ops = roundtrip(tmp_path, lambda x: OPS.bias_act(x, None, "gelu"), (x,))
    check(outs, refs)
    assert "Add" not in ops


@pytest.mark.parametrize("act,opset", [("silu", 20), ("gelu", 20), ("gelu_tanh", 18), ("relu", 20)])
def test_gated_act(tmp_path, act, opset):
    g, u = torch.randn(3, 4, 48) * 2, torch.randn(3, 4, 48)
    outs, refs, _ = roundtrip(tmp_path, lambda g, u: OPS.gated_act(g, u, act), (g, u), opset=opset)
    check(outs, refs)


def test_softmax_without_mask_scales_before_softmax(tmp_path):
    x = torch.randn(2, 4, 5, 19) * 4
    outs, refs, ops = roundtrip(tmp_path, lambda x: OPS.scaled_masked_softmax(x, None, 0.125), (x,))
    check(outs, refs)
    assert {"Mul", "Softmax"} <= ops


def test_softmax_broadcast_additive_mask(tmp_path):
    x = torch.randn(2, 4, 5, 19)
    mask = torch.zeros(2, 1, 1, 19)
    mask[1, ..., 12:] = -1e4
    outs, refs, ops = roundtrip(tmp_path, lambda x, m: OPS.scaled_masked_softmax(x, m, 0.5), (x, mask))
    check(outs, refs)
    assert (outs[0][1, ..., 12:] < 1e-6).all()


def test_softmax_broadcast_boolean_mask_is_where_minus_inf(tmp_path):
    x = torch.randn(2, 4, 5, 19)
    keep = torch.ones(5, 19, dtype=torch.bool).tril().expand(2, 1, 5, 19).contiguous()
    outs, refs, ops = roundtrip(tmp_path, lambda x, m: OPS.scaled_masked_softmax(x, m, 1.0), (x, keep))
    check(outs, refs)
    assert "Where" in ops and "Mul" not in ops
    assert (outs[0].masked_select(~keep) == 0).all()


def test_translations_follow_dynamic_shapes(tmp_path):
    """The ones weight of a weightless LayerNorm and the broadcast mask follow the runtime shapes."""
    batch, seq = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC

    def fn(x, r, s, m):
        return OPS.add_layer_norm(x, r, None, None, 1e-5)[0], OPS.scaled_masked_softmax(s, m, 0.3)

    args = (torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.randn(2, 2, 3, 3), torch.randn(2, 1, 1, 3))
    shapes = ({0: batch}, {0: batch}, {0: batch, 2: seq, 3: seq}, {0: batch, 3: seq})
    other = (torch.randn(5, 3, 16), torch.randn(5, 3, 16), torch.randn(5, 2, 7, 7), torch.randn(5, 1, 1, 7))
    outs, refs, _ = roundtrip(tmp_path, fn, args, dynamic_shapes=(shapes,), run_args=other)
    check(outs, refs)


def test_half_inputs_compute_in_fp32_and_return_half(tmp_path):
    x, r, w = torch.randn(2, 5, 32).half(), torch.randn(2, 5, 32).half(), torch.randn(32).half()
    outs, refs, ops = roundtrip(tmp_path, lambda x, r: OPS.add_rms_norm(x, r, w, 1e-6), (x, r))
    check(outs, refs, tol=2e-3)
    assert "Cast" in ops
