"""dsx.parallel.pipeline: a float and an int8 TinyGPT split over 2 gloo ranks give the single-process outputs, losses
and gradients (1F1B training, GPipe inference; one distributed run, checked per case); argument errors, a fused
graph's split, world size 1 (GPipe training) and the missing process group are checked in this process."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import SplitPoint

import dsx
from dsx.models import TinyGPT
from dsx.parallel.pipeline import Pipeline, _default_spec, _trace, pipeline
from tests.parallel.dist_utils import run_distributed

X = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))


def gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab=64, dim=32, layers=2, heads=2, max_len=16, dropout=0.0)


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


CASES = {  # model, trained, pipeline arguments
    "float": (gpt, True, dict(schedule="1f1b")),  # split evenly at the blocks
    "int8": (lambda: dsx.quantize(gpt().eval(), "int8", progress=False), False,
             dict(schedule="gpipe", split_spec=["blocks.1"], mesh="1-D")),
}


def _case(build, trained: bool, kwargs: dict) -> tuple[dict, Pipeline]:
    """This rank's view of one case (2 microbatches): output / losses against the single-process model (last
    stage), gradients of this stage's parameters against the single-process ones; and the pipeline."""
    model = build()
    ref = copy.deepcopy(model)  # the stages share the model's tensors
    if kwargs.get("mesh"):
        kwargs = {**kwargs, "mesh": init_device_mesh("cpu", (dist.get_world_size(),))}
    pipe = pipeline(model, X, microbatches=2, loss_fn=loss_fn if trained else None, **kwargs)
    result = {"stage": pipe.stage_index, "last": pipe.is_last, "stages": pipe.num_stages,
              "unwrapped": all("forward" not in vars(m) for m in model.modules())}  # torch's split wrappers
    if not trained:
        out = pipe.step(X)
        with torch.no_grad():
            expected = ref(X)
    else:
        losses: list = []
        out = pipe.eval(X, target=Y, losses=losses)
        pipe.module.zero_grad()
        pipe.step(X, target=Y)
        expected = ref(X)
        loss_fn(expected, Y).backward()
        result["losses"] = [loss.item() for loss in losses]
        result["ref_losses"] = [loss_fn(ref(x), y).item() for x, y in zip(X.chunk(2), Y.chunk(2))]
        result["grads"] = {n: None if p.grad is None else (p.grad - ref.get_parameter(n).grad).abs().max().item()
                           for n, p in pipe.module.named_parameters()}
        result["ref_params"] = [n for n, _ in ref.named_parameters()]
    if out is not None:
        result["error"] = (out - expected).abs().max().item() / expected.abs().max().item()
    return result, pipe


def _check_gradients(stages: list[dict]) -> None:
    """Every stage's gradients (and the last stage's microbatch losses) are the single-process ones."""
    assert stages[-1]["losses"] == pytest.approx(stages[-1]["ref_losses"], abs=1e-5)
    for stage in stages:
        assert stage["grads"] and all(e is not None and e <= 1e-5 for e in stage["grads"].values()), stage["grads"]
    # Every parameter is on a stage; the tied embedding / head on the first and the last, gradients summed.
    assert set(stages[0]["ref_params"]) <= set().union(*(stage["grads"] for stage in stages))
    if len(stages) > 1:
        assert "tok.weight" in stages[0]["grads"] and "head.weight" in stages[-1]["grads"]


def _ranks(rank: int, world: int) -> dict:
    return {name: _case(*case)[0] for name, case in CASES.items()}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_ranks, timeout=150)


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_stages_match_the_single_process_model(ranks, name):
    first, last = ranks[0][name], ranks[1][name]
    assert (first["stage"], first["last"], last["stage"], last["last"], last["stages"]) == (0, False, 1, True, 2)
    assert "error" not in first  # outputs come back on the last stage only
    assert first["unwrapped"] and last["unwrapped"]
    # Relative to the largest logit (|logit| ~ 30): the float stages run the same kernels on half the rows (equal
    # here); the int8 graph runs the dsx ops where eager int8 on this CPU may take fbgemm (same integers, other
    # float rounding of the epilogue: ~3e-7).
    assert last["error"] <= 1e-6


def test_a_1f1b_training_step_gives_the_single_process_gradients(ranks):
    _check_gradients([ranks[0]["float"], ranks[1]["float"]])


BAD = [
    (dict(stages=3), ValueError, r"stages: 3 stages but TinyGPT has 2 blocks in 'blocks'"),
    (dict(stages=0), ValueError, r"stages: expected an int >= 1, got 0"),
    (dict(stages=1.5), TypeError, r"stages: expected an int, got float"),
    (dict(stages="2"), TypeError, r"stages: expected an int, got str"),
    (dict(split_spec=["blocks.7"]), ValueError, r"split_spec: 'blocks.7' is not a submodule of TinyGPT; did you mean"),
    (dict(split_spec=["blocks.1"], stages=3), ValueError, r"stages: 3, but split_spec names 1 split points"),
    (dict(split_spec=7), TypeError, r"split_spec: expected a list of submodule names"),
    (dict(schedule="zigzag"), ValueError, r"schedule: expected one of \['1f1b', 'gpipe'\].*got 'zigzag'"),
    (dict(microbatches=0), ValueError, r"microbatches: expected an int >= 1"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[str(k) for k, _, _ in BAD])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        pipeline(gpt(), X, **kwargs)


def test_the_default_blocks_are_the_layers_not_the_experts_of_one():
    layers = torch.nn.ModuleList(torch.nn.ModuleDict({"experts": torch.nn.ModuleList(torch.nn.Linear(8, 8)
                                                                                     for _ in range(4))})
                                 for _ in range(3))
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 8), "layers": layers})
    assert _default_spec(model, 3) == {"layers.1": SplitPoint.BEGINNING, "layers.2": SplitPoint.BEGINNING}
    with pytest.raises(ValueError, match=r"split_spec: ModuleDict has no nn.ModuleList / nn.Sequential of blocks"):
        _default_spec(torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 8)}), 2)


def test_an_int8_model_is_refused_for_training():
    with pytest.raises(ValueError, match=r"loss_fn: .*dsx quantized linears.*qat=True"):
        pipeline(dsx.quantize(gpt().eval(), "int8", progress=False), X, loss_fn=loss_fn)


def test_a_fused_graph_splits_at_its_blocks():
    """dsx.Fuse's GraphModule calls no block module: torch's pipe_split markers go before the first node computing
    with each split block's tensors; the two stages, run in this process, give the fused model's output."""
    fused = dsx.Fuse(dynamic_batch=True)(gpt().eval(), X)
    spec = _default_spec(fused, 2)
    assert spec == {"blocks.1": SplitPoint.BEGINNING}
    pipe = _trace(fused, (X[:2],), spec)
    assert pipe.num_stages == 2
    blocks = [{n.split(".")[1] for n, _ in pipe.get_stage_module(i).named_parameters() if n.startswith("blocks.")}
              for i in range(2)]
    assert blocks == [{"0"}, {"1"}]
    with torch.no_grad():
        out, expected = torch.cat([pipe(x)[0] for x in X.chunk(2)]), fused(X)
    assert (out - expected).abs().max() <= 1e-6 * expected.abs().max()


no_group = pytest.mark.skipif(dist.is_initialized(), reason="needs this process without a process group")


@no_group
def test_without_a_process_group_the_error_says_how_to_start_one():
    with pytest.raises(RuntimeError, match=r"initialized process group.*init_process_group"):
        pipeline(gpt(), X)


@no_group
def test_world_size_1_runs_the_model_as_one_stage():
    """A 1-rank group: the whole model is one stage, still microbatched; GPipe training gives the eager gradients."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        result, pipe = _case(gpt, True, dict(schedule="gpipe"))
        assert (result["stages"], result["last"]) == (1, True) and result["error"] <= 1e-6
        _check_gradients([result])
        with pytest.raises(ValueError, match=r"stages: 2 stages, but the pipeline group's size is 1"):
            pipeline(gpt(), X, stages=2)
        with pytest.raises(ValueError, match=r"example_inputs: a batch of shapes \[\(4, 16\)\] does not split into 3"):
            pipeline(gpt(), X, microbatches=3)
        with pytest.raises(TypeError, match=r"mesh: expected a DeviceMesh or None, got str"):
            pipeline(gpt(), X, mesh="pp")
        with pytest.raises(ValueError, match=r"inputs: the pipeline was traced for batches of shapes"):
            pipe.step(X[:2], target=Y[:2])
        with pytest.raises(ValueError, match=r"target: eval\(\) of a pipeline built with loss_fn needs the target"):
            pipe.eval(X)
    finally:
        dist.destroy_process_group()
