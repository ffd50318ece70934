import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dsx.parallel.codecs import TopKCodec
from dsx.parallel.comm import CommStats, compress_gradients, parse_spec
from tests.parallel.dist_utils import run_distributed

EPOCHS, LR, BATCH, SEED = 40, 0.05, 32, 0
METHODS = {"none": (None, None), "fp16": ("fp16", None), "int8": ("int8", None), "int8+ef": ("int8", True),
           "topk": ("topk:0.01", None), "powersgd": ("powersgd:rank=4", None),
           "topk+4bit": ("topk:0.01,bits=4", None), "2:4": ("2:4", None)}


def _digits(rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """This rank's half of a fixed 75/25 split of scikit-learn digits, and the whole test set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    n = len(x_train) // world * world  # every rank takes the same number of steps
    f, i = (lambda a: torch.tensor(a, dtype=torch.float32)), (lambda a: torch.tensor(a, dtype=torch.long))
    return f(x_train[rank:n:world]), i(y_train[rank:n:world]), f(x_test), i(y_test)


def _train(rank: int, world: int, spec: str | None, error_feedback: bool | None) -> dict:
    """DDP-train a 64-128-10 MLP with linearly decaying SGD; small buckets so DDP's bucket rebuild is exercised."""
    torch.manual_seed(SEED)
    x, y, x_test, y_test = _digits(rank, world)
    model = DDP(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), bucket_cap_mb=0.02)
    stats = compress_gradients(model, spec, error_feedback=error_feedback) if spec else None
    steps = EPOCHS * math.ceil(len(x) / BATCH)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    order = torch.Generator().manual_seed(SEED + 1)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=order)
        for batch in perm.split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
            schedule.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    params = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()  # lists: see _one_step
    return {"accuracy": accuracy, "params": params, "stats": stats, "steps": steps}


def _train_all(rank: int, world: int) -> dict[str, dict]:
    return {name: _train(rank, world, *method) for name, method in METHODS.items()}


@pytest.fixture(scope="module")
def trained() -> list[dict[str, dict]]:
    return run_distributed(_train_all, timeout=480)  # 8 methods x 40 epochs: 1 min alone, over 4 on 2 busy cores


@pytest.mark.parametrize("method, min_ratio", [("int8", 3.9), ("int8+ef", 3.9), ("topk", 20), ("topk+4bit", 100),
                                               ("2:4", 3.5)])
def test_compressed_ddp_matches_uncompressed_accuracy_with_less_traffic(trained, method, min_ratio):
    base, run = trained[0]["none"], trained[0][method]
    assert base["accuracy"] > 0.96
    assert run["accuracy"] >= base["accuracy"] - 0.01, (method, run["accuracy"], base["accuracy"])
    for rank in trained:
        stats: CommStats = rank[method]["stats"]
        assert stats.ratio >= min_ratio, str(stats)
        assert stats.bytes_sent > 0 and stats.steps == run["steps"]


@pytest.mark.parametrize("method, ratio", [("fp16", 2.0), ("powersgd", 3.0)])
def test_fp16_and_powersgd_converge(trained, method, ratio):
    run = trained[0][method]
    assert run["accuracy"] >= trained[0]["none"]["accuracy"] - 0.015
    assert run["stats"].ratio >= ratio and run["stats"].steps == run["steps"]


@pytest.mark.parametrize("method", METHODS)
def test_every_rank_ends_with_identical_parameters(trained, method):
    assert trained[0][method]["params"] == trained[1][method]["params"]


def _one_step(rank: int, world: int) -> dict[str, tuple[list[float], list[float], CommStats]]:
    """Per spec: (averaged gradient from the hook, exact mean of the ranks' gradients, stats) after one step.

    Gradients come back as lists: a returned tensor is passed by file descriptor, which can fail once its rank exits.
    """
    out = {}
    for spec in ("int8", "int8:chunk=7", "topk:1", "topk:0.1", "topk:1,bits=4", "2:4", "2:4:bf16"):
        torch.manual_seed(0)
        model = DDP(nn.Linear(33, 5))  # 170 parameters: not a multiple of the world size nor of the chunk
        stats = compress_gradients(model, spec)
        torch.manual_seed(rank + 1)
        model(torch.randn(8, 33)).square().sum().backward()
        hooked = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.module.zero_grad()
        torch.manual_seed(rank + 1)
        model.module(torch.randn(8, 33)).square().sum().backward()
        exact = torch.cat([p.grad.flatten() for p in model.module.parameters()])
        dist.all_reduce(exact)
        out[spec] = (hooked.tolist(), (exact / world).tolist(), stats)
    return out


def _many_buckets(rank: int, world: int) -> dict[str, tuple[list[float], CommStats]]:
    """Per spec: parameters after 30 steps of a 6-layer MLP split into about 12 buckets, each rank on its own data.

    Hooks that start a collective from a future callback (torch's PowerSGD does) hang here on gloo unless waited for.
    """
    out = {}
    for spec, error_feedback in (("fp16", None), ("bf16", None), ("int8:chunk=64", True), ("topk:0.05", None),
                                 ("powersgd:rank=2,start_iter=2", None), ("topk:0.05,bits=4", None), ("2:4", None)):
        torch.manual_seed(0)
        model = DDP(nn.Sequential(*(nn.Linear(32, 32) for _ in range(6))), bucket_cap_mb=0.004)
        stats = compress_gradients(model, spec, error_feedback=error_feedback)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        torch.manual_seed(rank + 1)
        for _ in range(30):
            opt.zero_grad()
            model(torch.randn(16, 32)).square().mean().backward()
            opt.step()
        out[spec] = (torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(), stats)
    return out


def _three_ranks(rank: int, world: int) -> tuple[dict, dict]:
    return _one_step(rank, world), _many_buckets(rank, world)


def test_hooks_average_gradients_on_three_ranks_and_keep_them_in_sync_over_many_buckets():
    results = run_distributed(_three_ranks, world=3)
    one_step = [r[0] for r in results]
    for spec in one_step[0]:
        hooked, exact, stats = one_step[0][spec]
        assert all(hooked == r[spec][0] for r in one_step[1:]), spec
        hooked, exact = torch.tensor(hooked), torch.tensor(exact)
        assert stats.steps == 1 and stats.world_size == 3
        if spec.startswith("int8"):
            assert torch.allclose(hooked, exact, atol=2 * exact.abs().max().item() / 127), spec
        elif spec == "topk:1":
            assert torch.allclose(hooked, exact, atol=1e-5)
            sent = 2 * TopKCodec(1.0).size(170)  # all-gather of N-1 ranks: 680 B of values, a 22 B bitmap
            assert stats.ratio == pytest.approx((2 * 2 * 4 * 170 // 3) / sent) and sent == 2 * (680 + 22)
        elif spec == "topk:1,bits=4":  # every value at 4 bits: within half a step of each rank's chunk scale
            assert torch.allclose(hooked, exact, atol=exact.abs().max().item() / 7 * 1.5), spec
        elif spec.startswith("2:4"):  # 2:4 of each rank's shard, 2:4 of their mean: at most 2 of 4 per shard group
            shards = torch.nn.functional.pad(hooked, (0, 3 * 57 - 170)).view(3, 57)
            groups = torch.nn.functional.pad(shards, (0, 3)).view(3, 15, 4)
            assert ((groups != 0).sum(-1) <= 2).all() and (hooked - exact).norm() < exact.norm(), spec
            assert stats.ratio == pytest.approx((2 * 2 * 4 * 170 // 3) / (2 * 2 * (15 * 2 * 2 + 8)))
        else:  # each rank sends its 17 largest of 170: the result has at most 51 non-zeros
            assert 17 <= int((hooked != 0).sum()) <= 51
    many = [r[1] for r in results]
    for spec, (params, stats) in many[0].items():
        assert all(params == r[spec][0] for r in many[1:]), spec
        assert stats.steps == 30 and stats.bytes_sent < stats.bytes_uncompressed, spec


def _single_process(rank: int, world: int) -> dict:
    out = {}
    for spec in ("topk:0.01", "topk:0.01,bits=4", "2:4"):
        torch.manual_seed(0)
        model = DDP(nn.Linear(4, 3))
        stats = compress_gradients(model, spec)
        model(torch.ones(2, 4)).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.module.zero_grad()
        model.module(torch.ones(2, 4)).sum().backward()
        out[spec] = (stats, all(torch.equal(g, p.grad) for g, p in zip(grads, model.module.parameters())))
    dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="initialized process group") as e:
        compress_gradients(DDP.__new__(DDP), "int8")
    return {"specs": out, "error": str(e.value)}


def test_world_size_one_passes_buckets_through_and_no_group_is_a_clear_error():
    result = run_distributed(_single_process, world=1)[0]
    for spec, (stats, unchanged) in result["specs"].items():
        assert unchanged, spec
        assert (stats.bytes_sent, stats.bytes_uncompressed, stats.steps, stats.ratio) == (0, 0, 1, 1.0), spec
    assert "init_process_group" in result["error"]


def _inf_at_step_one(rank: int, world: int) -> dict[str, tuple[int, int, bool, int]]:
    """Per hook with error feedback: an inf in one gradient entry of rank 0 at step 1, the step skipped as
    GradScaler would; returns (non-finite gradient entries at step 1, at later steps, parameters finite, buckets
    counted non-finite)."""
    import warnings

    out = {}
    for spec in ("int8:chunk=64", "topk:0.05", "topk:0.05,bits=4", "2:4"):
        torch.manual_seed(0)
        model = DDP(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = compress_gradients(model, spec, error_feedback=True)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            torch.manual_seed(rank + 1)
            first, later = 0, 0
            for step in range(6):
                opt.zero_grad()
                x = torch.randn(16, 32)
                if step == 1 and rank == 0:
                    x[0, 0] = float("inf")
                model(x).square().mean().backward()
                bad = sum(int((~torch.isfinite(p.grad)).sum()) for p in model.parameters())
                if step == 1:
                    first = bad
                elif step > 1:
                    later += bad
                if bad == 0:
                    opt.step()
        warned = sum("held inf / NaN" in str(w.message) for w in caught)
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        out[spec] = (first, later, finite, stats.nonfinite_buckets, warned)
    return out


def test_error_feedback_recovers_from_one_inf_gradient():
    for rank, result in enumerate(run_distributed(_inf_at_step_one)):
        for spec, (first, later, finite, counted, warned) in result.items():
            assert first > 0, spec  # the inf reached every rank (the optimizer sees it and the step is skipped)
            assert later == 0 and finite, spec  # ... and never again: the residual did not keep it
            assert counted >= (1 if rank == 0 else 0) and warned <= 1, spec


def test_specs_parse_with_defaults_and_options():
    assert parse_spec("int8") == ("int8", {"chunk": 1024})
    assert parse_spec("int8:chunk=512") == ("int8", {"chunk": 512})
    assert parse_spec("topk:0.01") == ("topk", {"fraction": 0.01, "bits": 32})
    assert parse_spec("TopK:0.01, bits=4") == ("topk", {"fraction": 0.01, "bits": 4})
    assert parse_spec("topk:bits=8") == ("topk", {"fraction": 0.01, "bits": 8})
    assert parse_spec("2:4") == ("2:4", {"dtype": "fp16"})
    assert parse_spec("2:4:bf16") == parse_spec("2:4:dtype=bf16") == ("2:4", {"dtype": "bf16"})
    assert parse_spec("powersgd:rank=2, start_iter=5") == ("powersgd", {"rank": 2, "start_iter": 5})
    assert parse_spec("fp16") == ("fp16", {})


@pytest.mark.parametrize("spec, message", [
    ("int4", r"unknown gradient compression spec 'int4'; valid specs: fp16, bf16, int8.*topk.*powersgd"),
    ("topk:0", r"topk fraction must be in \(0, 1\], got 0.0"),
    ("topk:1.5", r"topk fraction must be in \(0, 1\], got 1.5"),
    ("topk:-0.1", r"topk fraction must be in \(0, 1\]"),
    ("topk:lots", r"topk fraction must be a number, got 'lots'"),
    ("int8:chunk=0", r"int8 chunk must be >= 1, got 0"),
    ("int8:chunk=1.5", r"int8 chunk must be an integer, got '1.5'"),
    ("int8:bits=4", r"unknown option 'bits=4'.*options of 'int8': chunk"),
    ("fp16:2", r"unknown option '2'.*options of 'fp16': none"),
    ("powersgd:start_iter=1", r"powersgd start_iter must be >= 2"),
    ("topk:0.01,bits=3", r"topk bits must be one of 4, 8, 32, got 3 in spec"),
    ("topk:0.01,bits=16", r"topk bits must be one of 4, 8, 32, got 16"),
    ("topk:0.01,bits=four", r"topk bits must be an integer, got 'four'"),
    ("topk:0.01,chunk=64", r"unknown option 'chunk=64'.*options of 'topk': fraction, bits"),
    ("topk:0.01;bits=4", r"unknown option '0.01;bits=4'.*options of 'topk': fraction, bits"),
    ("2:4:fp8", r"2:4 dtype must be one of fp16, bf16, got 'fp8'"),
    ("2:4:bits=4", r"unknown option 'bits=4'.*options of '2:4': dtype"),
    ("2:8", r"unknown gradient compression spec '2:8'; valid specs: .*2:4\[:dtype=fp16\]"),
    ("2:4x", r"unknown gradient compression spec '2:4x'"),
])
def test_bad_specs_are_clear_value_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        compress_gradients(nn.Linear(2, 2), spec)


def test_bad_model_and_options_are_clear_errors():
    with pytest.raises(TypeError, match="expects a torch.nn.parallel.DistributedDataParallel model, got Linear"):
        compress_gradients(nn.Linear(2, 2), "int8")
    with pytest.raises(ValueError, match="error_feedback is not supported for 'fp16'"):
        compress_gradients(nn.Linear(2, 2), "fp16", error_feedback=True)
    with pytest.raises(TypeError, match="spec must be a string"):
        compress_gradients(nn.Linear(2, 2), 8)
