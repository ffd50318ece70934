"""tensor_parallel over gloo ranks: float, int8 and fp8 linears (and tiny Hugging Face models) match the unsharded
model; bad plans and meshes are refused with clear errors. One distributed run per world size, checked per case."""

import copy

import pytest
import torch
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh

import dsx
from dsx.parallel.sharding import full_state_dict
from dsx.parallel.tensor_parallel import default_plan, tensor_parallel
from tests.parallel.dist_utils import run_distributed

FORMATS = ("int8", "int8_w7", "int8_weight_only", "int8_static", "fp8")


class GatedMLP(nn.Module):
    """A Llama-style MLP block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(64), GatedMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


def inputs(*shape: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(*shape)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def gather(local: torch.Tensor, mesh) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_gather_single(local.contiguous(), local.dim() - 1, mesh))


def quantized(model: nn.Module, fmt: str, x: torch.Tensor) -> nn.Module:
    return dsx.quantize(model, fmt, calibration=[x] if fmt == "int8_static" else None, progress=False, verify=False)


def error(fn) -> str:
    try:
        fn()
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def float_mlp(mesh) -> dict:
    ref, x = mlp(), inputs(4, 8, 64).requires_grad_()
    ref(x).square().mean().backward()
    tp = tensor_parallel(mlp(), mesh, {"0": "colwise", "2": "rowwise"})
    xt = x.detach().clone().requires_grad_()
    out = tp(xt)
    out.square().mean().backward()
    return {"out": rel(out, ref(x)), "x_grad": rel(xt.grad, x.grad),
            "w0_grad": rel(tp[0].weight.grad.full_tensor(), ref[0].weight.grad),
            "w2_grad": rel(tp[2].weight.grad.full_tensor(), ref[2].weight.grad)}


def int8_single(mesh, world: int, rank: int) -> dict:
    x = inputs(6, 128)
    torch.manual_seed(0)
    col_ref = quantized(nn.Sequential(nn.Linear(128, 96)), "int8", x)
    col = tensor_parallel(copy.deepcopy(col_ref), mesh, {"0": "colwise"})
    row_ref = quantized(nn.Sequential(nn.Linear(128, 48)), "int8", x)
    row = tensor_parallel(copy.deepcopy(row_ref), mesh, {"0": "rowwise"})
    return {"colwise": rel(gather(col(x), mesh), col_ref(x)), "rowwise": rel(row(x.chunk(world, -1)[rank]), row_ref(x)),
            "types": [f"{type(m[0]).__name__} {m[0].split.style} {tuple(m[0].weight.shape)}" for m in (col, row)]}


def quantized_mlps(mesh) -> dict:
    out = {}
    x = inputs(4, 8, 64)
    for fmt in FORMATS:
        ref = quantized(mlp(), fmt, x)
        tp = tensor_parallel(copy.deepcopy(ref), mesh, {"0": "colwise", "2": "rowwise"})
        state = full_state_dict(tp)
        out[fmt] = {"out": rel(tp(x), ref(x)), "state": sorted(state) == sorted(ref.state_dict()) and all(
            torch.equal(state[k].view(torch.uint8) if state[k].dtype.itemsize == 1 else state[k],
                        v.view(torch.uint8) if v.dtype.itemsize == 1 else v) for k, v in ref.state_dict().items())}
    ref = quantized(mlp(), "int8", x)
    tp = tensor_parallel(copy.deepcopy(ref), mesh, {"0": "colwise", "2": "rowwise"})
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).sum().backward()
    tp(xt).sum().backward()
    out["ste_input_grad"] = rel(xt.grad, xr.grad)
    return out


def default_plans(mesh) -> dict:
    out = {}
    x = inputs(2, 8, 64)
    torch.manual_seed(0)
    ref = Block()
    out["plan"] = default_plan(ref)
    tp = tensor_parallel(copy.deepcopy(ref), mesh)
    out["block"] = rel(tp(x), ref(x))
    qref = quantized(ref, "int8", x)
    out["block_int8"] = rel(tensor_parallel(copy.deepcopy(qref), mesh)(x), qref(x))
    return out


def hf_models(mesh) -> dict:
    from tests.hf_models import tiny_hf

    out = {}
    for name in ("llama", "bert", "gpt2"):
        model, kwargs = tiny_hf(name)
        with torch.no_grad():
            ref = model(**kwargs).last_hidden_state
            state = copy.deepcopy(model.state_dict())
            plan = default_plan(model)
            tp = tensor_parallel(model, mesh)
            full = full_state_dict(tp)
            same = full.keys() == state.keys() and all(torch.equal(full[k], v) for k, v in state.items())
            out[name] = {"out": rel(tp(**kwargs).last_hidden_state, ref), "split": len(plan), "state": same}
    for name in ("llama", "gpt2"):  # gpt2: Conv1D layers, and c_attn's fused q, k, v split three ways per rank
        model, kwargs = tiny_hf(name)
        qref = quantized(model, "int8", None)
        with torch.no_grad():
            tp = tensor_parallel(copy.deepcopy(qref), mesh)
            full = full_state_dict(tp)
            same = full.keys() == qref.state_dict().keys() and all(
                torch.equal(full[k], v) for k, v in qref.state_dict().items())
            out[f"{name}_int8"] = {"out": rel(tp(**kwargs).last_hidden_state, qref(**kwargs).last_hidden_state),
                                   "state": same}
    return out


def shard_api(mesh, world: int, rank: int) -> dict:
    """``QuantLinear.shard`` alone: state_dict as global DTensors, loading them (or whole tensors) back, refusals."""
    from torch.distributed.tensor import DTensor

    from dsx.quant.int4 import Int4WeightOnlyLinear

    x = inputs(5, 128)
    ref = quantized(nn.Sequential(nn.Linear(128, 64)), "int8_static", x)
    layer = copy.deepcopy(ref[0]).shard("rowwise", mesh)
    state = layer.state_dict()
    fresh = copy.deepcopy(ref[0])
    fresh.weight.zero_()
    fresh.shard("rowwise", mesh)
    fresh.load_state_dict(state)
    whole = copy.deepcopy(ref[0])
    whole.weight.zero_()
    whole.shard("rowwise", mesh)
    whole.load_state_dict(ref[0].state_dict())
    local = x.chunk(world, -1)[rank]
    int4 = Int4WeightOnlyLinear.from_float(nn.Linear(128, 64))
    return {
        "state": {k: (type(v).__name__, tuple(v.shape)) for k, v in state.items()},
        "local_weight": tuple(layer.weight.shape), "out": rel(layer(local), ref(x)),
        "loaded": rel(fresh(local), ref(x)), "loaded_whole": rel(whole(local), ref(x)),
        "repr": repr(layer).endswith(f"rowwise shard of {world} ranks)"),
        "twice": error(lambda: layer.shard("colwise", mesh)),
        "style": error(lambda: copy.deepcopy(ref[0]).shard("diagonal", mesh)),
        "int4": error(lambda: int4.shard("colwise", mesh)),
        "dtensor": isinstance(state["weight"], DTensor),
    }


def bad_inputs(mesh) -> dict:
    q = quantized(mlp(), "int8", None)
    qat = dsx.quantize(mlp(), "int8", qat=True, progress=False, verify=False)
    mesh2d = init_device_mesh("cpu", (1, mesh.size()))
    return {
        "missing": error(lambda: tensor_parallel(mlp(), mesh, {"0": "colwise", "fc9": "rowwise", "re:x.*": "rowwise"})),
        "style": error(lambda: tensor_parallel(mlp(), mesh, {"0": "diagonal"})),
        "mesh_2d": error(lambda: tensor_parallel(mlp(), mesh2d, {"0": "colwise"})),
        "not_mesh": error(lambda: tensor_parallel(mlp(), "cpu", {"0": "colwise"})),
        "divisible": error(lambda: tensor_parallel(nn.Sequential(nn.Linear(64, 63)), mesh, {"0": "colwise"})),
        "divisible_int8": error(lambda: tensor_parallel(quantized(nn.Sequential(nn.Linear(63, 64)), "int8", None),
                                                        mesh, {"0": "rowwise"})),
        "fp8_local_k": error(lambda: tensor_parallel(quantized(nn.Sequential(nn.Linear(48, 32)), "fp8", None), mesh,
                                                     {"0": "rowwise"})),
        "type": error(lambda: tensor_parallel(mlp(), mesh, {"1": "colwise"})),
        "qat": error(lambda: tensor_parallel(qat, mesh, {"0": "colwise"})),
        "masked": error(lambda: tensor_parallel(dsx.prune(mlp(), 0.5), mesh, {"0": "colwise"})),
        "no_default": error(lambda: tensor_parallel(mlp(), mesh)),
        "untouched": type(q[0]).__name__,
    }


def run_all(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    return {"float_mlp": float_mlp(mesh), "int8_single": int8_single(mesh, world, rank),
            "quantized_mlps": quantized_mlps(mesh), "default": default_plans(mesh), "hf": hf_models(mesh),
            "bad": bad_inputs(mesh), "shard_api": shard_api(mesh, world, rank)}


def run_world_one(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    x = inputs(4, 64)
    ref = quantized(mlp(), "int8", x)
    tp = tensor_parallel(copy.deepcopy(ref), mesh, {"0": "colwise", "2": "rowwise"})
    return {"float": rel(tensor_parallel(mlp(), mesh, {"0": "colwise", "2": "rowwise"})(x), mlp()(x)),
            "int8": rel(tp(x), ref(x))}


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(run_all)


def test_float_linears_match_unsharded_forward_and_backward(ranks):
    for r in ranks:
        assert all(v < 1e-5 for v in r["float_mlp"].values()), r["float_mlp"]


def test_int8_colwise_is_exact_and_rowwise_within_fp32_summation(ranks):
    for r in ranks:
        single = r["int8_single"]
        assert single["types"] == ["Int8Linear colwise (48, 128)", "Int8Linear rowwise (48, 64)"]
        assert single["colwise"] == 0
        assert single["rowwise"] <= 2 ** -23  # one fp32 ulp: the ranks' scaled partial products are summed


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_mlp_col_then_row_matches_unsharded(ranks, fmt):
    for r in ranks:
        result = r["quantized_mlps"][fmt]
        assert result["out"] <= 1e-5, result
        assert result["state"], "full_state_dict of the split model differs from the unsharded quantized model"


def test_straight_through_input_gradient_matches_unsharded(ranks):
    for r in ranks:
        assert r["quantized_mlps"]["ste_input_grad"] <= 1e-5


def test_default_plan_splits_gated_mlp_block(ranks):
    for r in ranks:
        d = r["default"]
        assert d["plan"] == {"mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"}
        assert d["block"] < 1e-5
        assert d["block_int8"] <= 1e-5


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2", "llama_int8", "gpt2_int8"])
def test_default_plan_on_tiny_hf_models(ranks, name):
    for r in ranks:
        result = r["hf"][name]
        if name.endswith("_int8"):
            assert result["out"] <= 1e-5 and result["state"], result
        else:
            assert result["split"] >= 8 and result["out"] < 1e-5 and result["state"], result


def test_shard_keeps_local_buffers_and_global_state_dict(ranks):
    for r in ranks:
        api = r["shard_api"]
        assert api["dtensor"] and api["state"] == {
            "weight": ("DTensor", (64, 128)), "weight_scale": ("DTensor", (64,)), "bias": ("DTensor", (64,)),
            "input_scale": ("DTensor", ())}
        assert api["local_weight"] == (64, 64) and api["repr"]
        assert api["out"] <= 1e-5 and api["loaded"] == api["out"] and api["loaded_whole"] == api["out"]
        assert api["twice"] == "ValueError: Int8StaticLinear is already a rowwise shard"
        assert api["style"] == "ValueError: style: expected one of ('colwise', 'rowwise'), got 'diagonal'"
        assert api["int4"].startswith("TypeError: Int4WeightOnlyLinear cannot be split colwise: no split dim for its "
                                      "buffers [") and "'qweight'" in api["int4"]


@pytest.mark.parametrize("case, expected", [
    ("missing", r"ValueError: plan: no module of the model matches \['fc9', 're:x\.\*'\]"),
    ("style", r"ValueError: plan: '0' has style 'diagonal'; expected one of \('colwise', 'rowwise'\)"),
    ("mesh_2d", r"ValueError: mesh: tensor_parallel needs a 1-D DeviceMesh, got a 2-D mesh of shape \(1, 2\)"),
    ("not_mesh", r"TypeError: mesh: expected a torch.distributed DeviceMesh, got str"),
    ("divisible", r"ValueError: plan: '0' \(colwise\) has out_features=63, not divisible by the 2 ranks"),
    ("divisible_int8", r"ValueError: plan: '0' \(rowwise\) has in_features=63, not divisible by the 2 ranks"),
    ("fp8_local_k", r"ValueError: mesh: a rowwise split over 2 ranks leaves this fp8 layer 32 x 24 per rank; "
                    r"torch._scaled_mm needs multiples of 16"),
    ("type", r"TypeError: plan: '1' is a GELU; tensor_parallel splits \['nn.Linear'"),
    ("qat", r"TypeError: plan: '0' is a QATLinear"),
    ("masked", r"ValueError: plan: '0' has parametrizations .* dsx.make_permanent"),
    ("no_default", r"ValueError: plan: the default plan found no transformer attention or MLP layers"),
])
def test_bad_input_is_refused(ranks, case, expected):
    import re

    for r in ranks:
        assert re.match(expected, r["bad"][case]), r["bad"][case]


def test_world_size_one_is_a_no_op_split():
    (result,) = run_distributed(run_world_one, world=1)
    # the same integer products; the CPU kernels (fbgemm, torch._int_mm) may round the fp32 epilogue differently
    assert result["float"] < 1e-6 and result["int8"] < 1e-6, result
