"""QAT, 2:4 sparse, pruned and structurally pruned models train under DDP and FSDP2 on 2 gloo ranks: every rank ends
with the same full weights as one process averaging the ranks' losses, masks and the 2:4 pattern hold, and
``dsx.convert`` of the QAT model gives bit-identical int8 weights and scales on every rank."""

import copy
import hashlib

import pytest
import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

import dsx
from dsx.compress.masks import get_mask, masked_modules
from dsx.compress.sparsity import check_2to4
from dsx.parallel.sharding import full_state_dict, prepare_for_ddp, shard
from tests.parallel.dist_utils import run_distributed

KINDS = ("qat", "qat_static", "sparse", "pruned", "structured")
WRAPS = ("ddp", "fsdp")
STEPS = 3


def batches(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each rank's (input, target) per step; every rank builds all of them to run the single-process reference."""
    torch.manual_seed(1)
    return [[(torch.randn(8, 64), torch.randn(8, 32)) for _ in range(world)] for _ in range(STEPS)]


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(16, 64)
    if kind == "qat":
        return dsx.quantize(model, "int8", qat=True, progress=False, verify=False)
    if kind == "qat_static":
        return dsx.quantize(model, "int8_static", qat=True, calibration=[x], progress=False, verify=False)
    if kind == "sparse":
        return dsx.sparsify(model, "2:4")
    if kind == "pruned":
        return dsx.prune(model, 0.5)
    return dsx.prune(model, 0.5, structured=True, example_inputs=x)


def train(model: nn.Module, steps: list, rank: int | None) -> None:
    """SGD with momentum and weight decay; ``rank`` None: one process on the mean of every rank's loss."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    for step in steps:
        mine = step if rank is None else [step[rank]]
        loss = sum(nn.functional.mse_loss(model(x), y) for x, y in mine) / len(mine)
        opt.zero_grad()
        loss.backward()
        opt.step()


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def scenario(kind: str, wrap: str, rank: int, world: int) -> dict:
    steps = batches(world)
    template = build(kind)
    reference = copy.deepcopy(template)
    train(reference, steps, None)
    model = copy.deepcopy(template)
    masks = {n: get_mask(m).clone() for n, m in masked_modules(model).items()}
    if wrap == "ddp":
        wrapped = DistributedDataParallel(prepare_for_ddp(model))
    else:
        wrapped = shard(model, init_device_mesh("cpu", (world,)), units=["0", "re:2"])
    train(wrapped, steps, rank)
    full = full_state_dict(wrapped)
    plain = copy.deepcopy(template)
    plain.load_state_dict(full)
    ref_state = reference.state_dict()
    out = {
        "digests": {k: digest(v) for k, v in full.items()},
        "vs_reference": max(((v.float() - ref_state[k].float()).abs().max() / ref_state[k].float().abs().max()).item()
                            for k, v in full.items() if v.is_floating_point()),
        "trained": not torch.equal(plain[0].weight, template[0].weight),
        "masks_kept": all(torch.equal(get_mask(plain.get_submodule(n)), m) for n, m in masks.items()),
        "pruned_zero": all(not plain.get_submodule(n).weight[~m].any() for n, m in masks.items()),
        "shapes": [tuple(p.shape) for p in plain.parameters()],
    }
    if kind == "sparse":
        out["2:4"] = [check_2to4(plain.get_submodule(n).weight) for n in masks]
    if wrap == "fsdp" and masks:
        between = model[0].weight
        out["weight_between_forwards"] = torch.equal(between.full_tensor(), plain[0].weight)
    if kind.startswith("qat"):
        converted = dsx.convert(plain, verify=False)
        out["int8"] = {f"{i}.{k}": (str(v.dtype), digest(v)) for i in (0, 2)
                       for k, v in converted[i].state_dict().items()}
        out["scales_learned"] = not torch.equal(plain[0].weight_scale, template[0].weight_scale)
    return out


def refused(world: int) -> dict:
    model = dsx.quantize(build("structured"), "int8_static", qat=True, progress=False, verify=False)
    out = {}
    for name, fn in {"ddp": lambda: prepare_for_ddp(model),
                     "fsdp": lambda: shard(model, init_device_mesh("cpu", (world,))),
                     "units": lambda: shard(build("pruned"), init_device_mesh("cpu", (world,)), units=["fc9"])}.items():
        try:
            fn()
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out


def run_all(rank: int, world: int) -> dict:
    return {"refused": refused(world), **{(kind, wrap): scenario(kind, wrap, rank, world) for kind in KINDS
                                          for wrap in WRAPS}}


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(run_all)


CASES = [(kind, wrap) for kind in KINDS for wrap in WRAPS]


@pytest.mark.parametrize("kind, wrap", CASES)
def test_every_rank_holds_the_same_full_weights(ranks, kind, wrap):
    first, second = (r[(kind, wrap)] for r in ranks)
    assert first["digests"] == second["digests"]
    assert first["trained"]


@pytest.mark.parametrize("kind, wrap", CASES)
def test_training_matches_one_process_on_the_mean_loss(ranks, kind, wrap):
    for r in ranks:
        assert r[(kind, wrap)]["vs_reference"] < 1e-5, r[(kind, wrap)]["vs_reference"]


@pytest.mark.parametrize("kind, wrap", [c for c in CASES if c[0] in ("sparse", "pruned")])
def test_masks_and_2to4_pattern_hold(ranks, kind, wrap):
    for r in ranks:
        result = r[(kind, wrap)]
        assert result["masks_kept"] and result["pruned_zero"]
        assert result.get("2:4", [True, True]) == [True, True]
        if wrap == "fsdp":
            assert result["weight_between_forwards"]


@pytest.mark.parametrize("wrap", WRAPS)
def test_structured_pruned_model_keeps_its_shapes(ranks, wrap):
    for r in ranks:
        assert r[("structured", wrap)]["shapes"] == [(32, 64), (32,), (32, 32), (32,)]


@pytest.mark.parametrize("kind, wrap", [c for c in CASES if c[0].startswith("qat")])
def test_converted_qat_model_is_bit_identical_on_every_rank(ranks, kind, wrap):
    first, second = (r[(kind, wrap)] for r in ranks)
    assert first["int8"] == second["int8"]
    assert first["int8"]["0.weight"][0] == "torch.int8"
    assert first["scales_learned"]


def test_unset_static_qat_scales_and_unknown_units_are_refused(ranks):
    for r in (r["refused"] for r in ranks):
        assert "QAT layers ['0', '2'] have no activation scale yet" in r["ddp"]
        assert r["fsdp"] == r["ddp"]
        assert r["units"] == "units: no module of the model matches ['fc9']"
