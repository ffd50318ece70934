"""Bad input to dsx.parallel that needs no process group: compress_gradients' specs and model check, tensor_parallel /
shard meshes, all_reduce_scalar / sync_observers, and the save_checkpoint / load_checkpoint argument and file
checks. Each is refused with an error naming the argument, with the caller's model (and optimizer) left as they were
and no checkpoint files written or changed."""

import json
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import dsx
from dsx.parallel import all_reduce_scalar, compress_gradients, load_checkpoint, save_checkpoint, sync_observers
from tests.bad_input.conftest import assert_refused, assert_untouched, case, mlp, snapshot, tree_digest, x

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(dist.is_available() and dist.is_initialized(),
                                 reason="these cases are about running without a process group")]




SPEC_CASES = [
    ("unknown", "zstd"), ("empty", ""), ("int", 8), ("None", None), ("list", ["int8"]),
    ("topk-zero", "topk:0"), ("topk-above-one", "topk:1.5"), ("topk-negative", "topk:-0.1"),
    ("topk-nan", "topk:nan"), ("topk-inf", "topk:inf"), ("topk-word", "topk:lots"),
    ("int8-chunk-zero", "int8:chunk=0"), ("int8-chunk-word", "int8:chunk=big"), ("int8-chunk-float", "int8:chunk=1.5"),
    ("int8-unknown-option", "int8:block=64"), ("powersgd-rank-zero", "powersgd:rank=0"),
    ("powersgd-start_iter-one", "powersgd:start_iter=1"), ("fp16-option", "fp16:scale=2"),
    ("topk-bits-three", "topk:0.01,bits=3"), ("topk-bits-word", "topk:0.01,bits=four"),
    ("topk-bits-float", "topk:0.01,bits=4.0"), ("topk-chunk", "topk:0.01,chunk=64"), ("2:4-dtype", "2:4:fp8"),
    ("2:4-option", "2:4:bits=4"), ("2:8", "2:8"), ("2:4-suffix", "2:4x"),
]

CASES = [
    *(case(f"compress_gradients-spec-{name}", lambda m, p, s=spec: compress_gradients(m, s), "spec")
      for name, spec in SPEC_CASES),
    case("compress_gradients-error_feedback-fp16", lambda m, p: compress_gradients(m, "fp16", error_feedback=True),
         "error_feedback"),
    case("compress_gradients-error_feedback-bf16", lambda m, p: compress_gradients(m, "bf16", error_feedback=True),
         "error_feedback"),
    # tensor_parallel / shard: the mesh is checked before anything distributed
    case("tensor_parallel-mesh-str", lambda m, p: dsx.parallel.tensor_parallel(m, "mesh"), "mesh"),
    case("tensor_parallel-mesh-None", lambda m, p: dsx.parallel.tensor_parallel(m, None), "mesh"),
    case("shard-mesh-str", lambda m, p: dsx.parallel.shard(m, "mesh"), "mesh"),
    case("shard-mesh-None", lambda m, p: dsx.parallel.shard(m, None), "mesh"),
    # collectives' own arguments
    case("all_reduce_scalar-op-unknown", lambda m, p: all_reduce_scalar(1.0, "median"), "op"),
    case("sync_observers-str", lambda m, p: sync_observers("observers"), "observers"),
    case("sync_observers-bad-value", lambda m, p: sync_observers({"0": 1}), "observers"),
    # save_checkpoint
    case("save_checkpoint-step-negative", lambda m, p: save_checkpoint(p / "ckpt", m, step=-1), "step"),
    case("save_checkpoint-step-float", lambda m, p: save_checkpoint(p / "ckpt", m, step=1.5), "step"),
    case("save_checkpoint-step-bool", lambda m, p: save_checkpoint(p / "ckpt", m, step=True), "step"),
    case("save_checkpoint-step-str", lambda m, p: save_checkpoint(p / "ckpt", m, step="3"), "step"),
    case("save_checkpoint-step-None", lambda m, p: save_checkpoint(p / "ckpt", m, step=None), "step"),
    case("save_checkpoint-extra-str", lambda m, p: save_checkpoint(p / "ckpt", m, step=1, extra="epoch 3"), "extra"),
    case("save_checkpoint-extra-list", lambda m, p: save_checkpoint(p / "ckpt", m, step=1, extra=[3]), "extra"),
    case("save_checkpoint-extra-not-json", lambda m, p: save_checkpoint(p / "ckpt", m, step=1,
                                                                        extra={"f": object()}), "extra"),
    case("save_checkpoint-model-str", lambda m, p: save_checkpoint(p / "ckpt", "model", step=1), "model"),
    case("save_checkpoint-model-state_dict", lambda m, p: save_checkpoint(p / "ckpt", m.state_dict(), step=1),
         "model"),
    case("save_checkpoint-optimizer-str", lambda m, p: save_checkpoint(p / "ckpt", m, "sgd", step=1), "optimizer"),
    case("save_checkpoint-optimizer-state_dict",
         lambda m, p: save_checkpoint(p / "ckpt", m, torch.optim.SGD(m.parameters(), lr=0.1).state_dict(), step=1),
         "optimizer"),
    # load_checkpoint: arguments
    case("load_checkpoint-model-str", lambda m, p: load_checkpoint(p / "saved", "model"), "model"),
    case("load_checkpoint-optimizer-str", lambda m, p: load_checkpoint(p / "saved", m, "sgd"), "optimizer"),
    case("load_checkpoint-path-missing", lambda m, p: load_checkpoint(p / "nowhere", m), "path",
         exc=FileNotFoundError),
    case("load_checkpoint-path-empty-dir", lambda m, p: load_checkpoint(p / "empty", m), "path",
         exc=FileNotFoundError),
    case("load_checkpoint-path-only-partial", lambda m, p: load_checkpoint(p / "partial", m), "path",
         exc=FileNotFoundError),
    # load_checkpoint: a checkpoint of another model
    case("load_checkpoint-model-other-shape", lambda m, p: load_checkpoint(p / "saved", m), "model",
         make=lambda: nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 32))),
    case("load_checkpoint-model-other-keys", lambda m, p: load_checkpoint(p / "saved", m), "model",
         make=lambda: nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))),
    case("load_checkpoint-model-pruned", lambda m, p: load_checkpoint(p / "saved", m), "model",
         make=lambda: dsx.prune(mlp(), 0.5)),
    case("load_checkpoint-model-other-dtype", lambda m, p: load_checkpoint(p / "saved", m), "model",
         make=lambda: mlp().double()),
]


@pytest.fixture
def ckpt_dir(tmp_path):
    """``saved``: one complete checkpoint of ``mlp()`` at step 3; ``empty``; ``partial``: only an unfinished save."""
    model = mlp()
    save_checkpoint(tmp_path / "saved", model, step=3)
    (tmp_path / "empty").mkdir()
    (tmp_path / "partial" / "step_5.tmp").mkdir(parents=True)
    (tmp_path / "file.txt").write_text("a file")
    return tmp_path


@pytest.mark.parametrize("make, call, exc, match", CASES)
def test_refused(make, call, exc, match, ckpt_dir):
    before = tree_digest(ckpt_dir)
    assert_refused(make(), call, exc, match, ckpt_dir)
    assert tree_digest(ckpt_dir) == before, "a refused call changed the checkpoint files"


def _stepped(model):
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(x()).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def _corrupt(kind, step_dir):
    meta = step_dir / "dsx_checkpoint.json"
    if kind == "meta-not-json":
        meta.write_text("{not json")
    elif kind == "meta-wrong-format":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": "other"}))
    elif kind == "meta-wrong-version":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 7}))
    elif kind == "dcp-metadata-garbage":
        (step_dir / ".metadata").write_bytes(b"\x80\x04garbage")


@pytest.mark.parametrize("kind", ["meta-not-json", "meta-wrong-format", "meta-wrong-version",
                                  "dcp-metadata-garbage"])
def test_load_checkpoint_corrupt(kind, tmp_path):
    step_dir = save_checkpoint(tmp_path / "ckpt", mlp(), step=1)
    _corrupt(kind, step_dir)
    before = tree_digest(tmp_path)
    model = mlp()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(str(step_dir))):
        load_checkpoint(step_dir, model)
    assert_untouched(model, snap)
    assert tree_digest(tmp_path) == before


def test_load_checkpoint_other_optimizer(tmp_path):
    """A checkpoint of Adam's state into an SGD-with-momentum optimizer: refused, model and optimizer untouched."""
    saved = mlp()
    step_dir = save_checkpoint(tmp_path / "ckpt", saved, _stepped(saved), step=1)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x()).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    state = json.dumps(opt.state_dict(), default=lambda t: t.tolist())
    snap = snapshot(model)
    with pytest.raises(ValueError, match="optimizer"):
        load_checkpoint(step_dir, model, opt)
    assert_untouched(model, snap)
    assert json.dumps(opt.state_dict(), default=lambda t: t.tolist()) == state, "the optimizer's state changed"
