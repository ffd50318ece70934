import io
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard

import dsx
import dsx.parallel.checkpoint as checkpoint
from dsx.compress.masks import apply_mask, get_mask
from dsx.compress.sparsity import mask_2to4
from dsx.parallel.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dsx.quant.qat import QATLinear
from tests.parallel.dist_utils import run_distributed

STEPS, EVERY, CRASH_AT = 9, 3, 6


def _mlp(width=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 4))


def _batch(step, rank):
    """The training batch of ``rank`` at ``step``: the data order depends on the step alone, not on the run."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def _masked_qat(rank=0):
    """A QAT classifier (learned weight and activation scales) whose QAT weights are 2:4 masked."""
    model = dsx.quantize(_mlp(), "int8_static", qat=True, calibration=[_batch(-1, rank)[0]], progress=False)
    for m in model.modules():
        if isinstance(m, QATLinear):
            apply_mask(m, mask_2to4(m.weight))
    return model


KINDS = {
    "plain": _mlp,
    "pruned": lambda: dsx.prune(_mlp(), 0.5),
    "masked_qat": _masked_qat,
    "int8_static": lambda: dsx.quantize(_mlp(), "int8_static", calibration=[_batch(-1, 0)[0]], progress=False),
}


def _step(model, optimizer, step, rank=0):
    x, y = _batch(step, rank)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _optimizer_state(optimizer):
    return {i: dict(s) for i, s in optimizer.state_dict()["state"].items()}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_restores_every_tensor_and_the_optimizer(kind, tmp_path):
    model = KINDS[kind]()
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-2) if params else None
    for step in range(2 if params else 0):
        _step(model, optimizer, step)
    path = save_checkpoint(tmp_path, model, optimizer, step=2, extra={"epoch": 1})
    assert path == tmp_path / "step_2" and latest_checkpoint(tmp_path) == path

    fresh = KINDS[kind]()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-2) if params else None
    info = load_checkpoint(tmp_path, fresh, fresh_optimizer)
    assert info == {"step": 2, "extra": {"epoch": 1}, "path": path}
    _assert_same(model.state_dict(), fresh.state_dict())
    if kind in ("pruned", "masked_qat"):
        assert any(get_mask(m) is not None for m in fresh.modules())
    if params:
        _assert_same(_optimizer_state(optimizer), _optimizer_state(fresh_optimizer))
        _step(model, optimizer, 2)
        _step(fresh, fresh_optimizer, 2)
        _assert_same(model.state_dict(), fresh.state_dict())


def test_latest_skips_unfinished_saves_and_resaving_a_step_replaces_it(tmp_path):
    model = _mlp()
    for step in (3, 10):
        save_checkpoint(tmp_path, model, step=step)
    (tmp_path / "step_20.tmp").mkdir()
    (tmp_path / "step_30").mkdir()
    (tmp_path / "notes").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"
    with torch.no_grad():
        model[0].bias.fill_(7.0)
    save_checkpoint(tmp_path, model, step=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step_10", "step_20.tmp", "step_3", "step_30"]
    fresh = _mlp()
    assert load_checkpoint(tmp_path, fresh)["step"] == 10
    assert torch.equal(fresh[0].bias, torch.full((32,), 7.0))
    assert load_checkpoint(tmp_path / "step_3", fresh)["step"] == 3
    assert latest_checkpoint(tmp_path / "absent") is None


def test_saving_before_the_first_step_leaves_the_optimizer_stateless(tmp_path):
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters())
    save_checkpoint(tmp_path, model, optimizer, step=0)
    assert not optimizer.state
    fresh = _mlp()
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    assert load_checkpoint(tmp_path, fresh, fresh_optimizer)["step"] == 0
    assert not fresh_optimizer.state


def test_missing_checkpoints_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"path: {tmp_path / 'nowhere'} does not exist"):
        load_checkpoint(tmp_path / "nowhere", _mlp())
    (tmp_path / "step_5.tmp").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no complete checkpoint .* in {tmp_path}"):
        load_checkpoint(tmp_path, _mlp())


def test_a_model_or_optimizer_that_does_not_fit_is_refused(tmp_path):
    model = dsx.prune(_mlp(), 0.5)
    optimizer = torch.optim.Adam(model.parameters())
    _step(model, optimizer, 0)
    save_checkpoint(tmp_path, model, optimizer, step=1)
    with pytest.raises(ValueError, match=r"does not fit the model \(missing from the checkpoint: \['0.weight'"):
        load_checkpoint(tmp_path, _mlp())
    with pytest.raises(ValueError, match=r"saved torch.float32 \(32, 16\), model has torch.float32 \(8, 16\)"):
        load_checkpoint(tmp_path, dsx.prune(_mlp(8), 0.5))
    fresh = dsx.prune(_mlp(), 0.5)
    sgd = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="optimizer: .* holds another optimizer's state"):
        load_checkpoint(tmp_path, fresh, sgd)
    assert not sgd.state


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="step: expected a non-negative int"):
        save_checkpoint(tmp_path, _mlp(), step=-1)
    with pytest.raises(TypeError, match="extra: expected a JSON-able dict"):
        save_checkpoint(tmp_path, _mlp(), step=1, extra={"x": torch.ones(1)})
    with pytest.raises(TypeError, match="optimizer: expected"):
        save_checkpoint(tmp_path, _mlp(), "adam", step=1)
    assert not any(tmp_path.iterdir())


def _die_before_commit(*args):
    os._exit(1)


def _train(rank, world, root, crash_at=None, asynchronous=False):
    """DDP-train the masked QAT classifier to ``STEPS``, checkpointing every ``EVERY`` steps and resuming from the
    newest checkpoint in ``root``; with ``crash_at``, rank 0 is killed while committing that step's checkpoint (an
    asynchronous one: while it is being written, training going on)."""
    torch.use_deterministic_algorithms(True)
    model = _masked_qat(rank)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    start = load_checkpoint(root, ddp, optimizer)["step"] if latest_checkpoint(root) else 0
    pending = None
    for step in range(start, STEPS):
        _step(ddp, optimizer, step, rank)
        if (step + 1) % EVERY == 0:
            if step + 1 == crash_at and rank == 0 and not asynchronous:
                checkpoint._commit = _die_before_commit
            pending = save_checkpoint(root, ddp, optimizer, step=step + 1, extra={"resumed_from": start},
                                      asynchronous=asynchronous)
            if step + 1 == crash_at and rank == 0 and asynchronous:
                os._exit(1)  # killed while the checkpoint is written in the background
    if asynchronous:
        assert pending.wait() == root / f"step_{STEPS}"
    return {"start": start, "model": model.state_dict(), "optimizer": _optimizer_state(optimizer)}


def _sharded_pruned():
    model = dsx.prune(_mlp(), 0.5)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    return fully_shard(model)


def _fsdp_round_trip(rank, root):
    """Save an FSDP2-sharded pruned model (DTensor parameters) after a step, load it into a fresh sharded one."""
    model = _sharded_pruned()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _step(model, optimizer, 0, rank)
    save_checkpoint(root, model, optimizer, step=1)
    fresh = _sharded_pruned()
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    load_checkpoint(root, fresh, fresh_optimizer)
    full = StateDictOptions(full_state_dict=True)
    return get_state_dict(model, optimizer, options=full), get_state_dict(fresh, fresh_optimizer, options=full)


def _resume_and_reference(rank, world, root, reference, sharded):
    out = {"resumed": _train(rank, world, root), "reference": _train(rank, world, reference),
           "fsdp": _fsdp_round_trip(rank, sharded)}
    buffer = io.BytesIO()
    torch.save(out, buffer)  # bytes, not shared-memory tensors, which die with the worker
    return buffer.getvalue()


def test_a_killed_ddp_job_resumes_bit_exactly(tmp_path):
    root, reference, sharded = tmp_path / "run", tmp_path / "reference", tmp_path / "fsdp"
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        run_distributed(_train, root, CRASH_AT)
    assert latest_checkpoint(root) == root / f"step_{EVERY}"
    assert (root / f"step_{CRASH_AT}.tmp" / ".metadata").is_file()

    ranks = [torch.load(io.BytesIO(raw)) for raw in run_distributed(_resume_and_reference, root, reference, sharded)]
    for out in ranks:
        assert out["resumed"]["start"] == EVERY and out["reference"]["start"] == 0
        _assert_same(out["resumed"]["model"], out["reference"]["model"])
        _assert_same(out["resumed"]["optimizer"], out["reference"]["optimizer"])
    _assert_same(ranks[0]["resumed"]["model"], ranks[1]["resumed"]["model"])
    assert any(k.endswith(".mask") for k in ranks[0]["resumed"]["model"])
    assert any(k.endswith("input_scale") for k in ranks[0]["resumed"]["model"])
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_6", "step_9"]

    final = _masked_qat()
    info = load_checkpoint(root, final)
    assert info["step"] == STEPS and info["extra"] == {"resumed_from": EVERY}
    _assert_same(final.state_dict(), ranks[0]["reference"]["model"])

    (saved, saved_optimizer), (loaded, loaded_optimizer) = ranks[0]["fsdp"]
    _assert_same(saved, loaded)
    _assert_same(saved_optimizer["state"], loaded_optimizer["state"])
    unsharded = dsx.prune(_mlp(), 0.5)
    load_checkpoint(sharded, unsharded)  # resharded: from 2 FSDP ranks into one plain module
    _assert_same(unsharded.state_dict(), saved)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _saved_step(tmp_path):
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _step(model, opt, 0)
    return model, opt, save_checkpoint(tmp_path / "ckpt", model, opt, step=1)


def test_a_crafted_metadata_file_is_refused_and_runs_nothing(tmp_path):
    import pickle

    model, opt, ckpt = _saved_step(tmp_path)
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"load_checkpoint: .*\.metadata refused: posix\.system|os\.system"):
        load_checkpoint(tmp_path / "ckpt", model, opt)
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_shard_path_outside_the_checkpoint_is_refused(tmp_path):
    import pickle

    from dsx.parallel.safe_dcp import load_metadata

    model, opt, ckpt = _saved_step(tmp_path)
    meta = load_metadata((ckpt / ".metadata").read_bytes(), "x")
    info = next(iter(meta.storage_data.values()))
    info.relative_path = "../../outside.distcp"
    with pytest.raises(ValueError, match="leaves the checkpoint"):
        load_metadata(pickle.dumps(meta), ".metadata")


def test_a_crafted_non_tensor_entry_is_refused_and_runs_nothing(tmp_path):
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from dsx.parallel.safe_dcp import SafeLoadPlanner, load_metadata

    model, opt, ckpt = _saved_step(tmp_path)
    meta = load_metadata((ckpt / ".metadata").read_bytes(), "x")
    fqn = next(k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    info = next(v for k, v in meta.storage_data.items() if k.fqn == fqn)
    shard = ckpt / info.relative_path
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_RunsCode(marker), buf)
    info.offset, info.length = shard.stat().st_size, len(buf.getvalue())
    with open(shard, "ab") as f:  # the crafted entry goes at the end of the shard, the metadata points at it
        f.write(buf.getvalue())
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"load_checkpoint: the entry {fqn} refused.*nothing was loaded"):
        load_checkpoint(tmp_path / "ckpt", model, opt)
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException, match="refused"):  # the planner refuses too, should the file change
        torch.distributed.checkpoint.load({"optim": {"param_groups": [{"lr": 0.0}]}}, checkpoint_id=ckpt,
                                          planner=SafeLoadPlanner(), no_dist=True)
    assert not marker.exists()


def test_an_asynchronous_save_holds_the_state_at_save_time_and_commits_on_wait(tmp_path):
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _step(model, optimizer, 0)
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    handle = save_checkpoint(tmp_path, model, optimizer, step=1, asynchronous=True)
    assert isinstance(handle, dsx.parallel.AsyncCheckpoint) and handle.path == tmp_path / "step_1"
    _step(model, optimizer, 1)  # training goes on while the checkpoint is written
    assert latest_checkpoint(tmp_path) is None  # committed by wait(), not before
    assert handle.wait() == tmp_path / "step_1" and handle.wait() == tmp_path / "step_1" and handle.done()
    fresh = _mlp(width=32)
    load_checkpoint(tmp_path, fresh)
    _assert_same(fresh.state_dict(), at_save)

    save_checkpoint(tmp_path, model, optimizer, step=2, asynchronous=True)
    save_checkpoint(tmp_path, model, optimizer, step=3)  # finishes the pending save first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2", "step_3"]
    with pytest.raises(TypeError, match="asynchronous"):
        save_checkpoint(tmp_path, model, step=4, asynchronous="yes")


def _resume_async(rank, world, root, reference):
    out = {"resumed": _train(rank, world, root, asynchronous=True),
           "reference": _train(rank, world, reference, asynchronous=True)}
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


def test_a_ddp_job_killed_during_an_asynchronous_save_resumes_bit_exactly(tmp_path):
    root, reference = tmp_path / "run", tmp_path / "reference"
    with pytest.raises(RuntimeError, match="failed"):
        run_distributed(_train, root, CRASH_AT, True)
    assert latest_checkpoint(root) == root / f"step_{EVERY}"
    ranks = [torch.load(io.BytesIO(raw)) for raw in run_distributed(_resume_async, root, reference)]
    for out in ranks:
        assert out["resumed"]["start"] == EVERY and out["reference"]["start"] == 0
        _assert_same(out["resumed"]["model"], out["reference"]["model"])
        _assert_same(out["resumed"]["optimizer"], out["reference"]["optimizer"])
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_6", "step_9"]
