"""Tests for dsx.core.serialize: bit-exact save/load of transformed models by history replay, without pickle."""

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from dsx.core.serialize import load, save
from dsx.core.transform import Transform, history


class Net(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 16), nn.GELU(), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Other(Net):
    pass


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("table", torch.randn(6, 5).t())

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h) + (h @ self.table.t()).sum(-1, keepdim=True)


class Int8Linear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach()
        scale = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = lin.bias

    def forward(self, x):
        return F.linear(x, self.qweight.float() * self.scale, self.bias)


@dataclass
class QuantizeLinears(Transform):
    name = "ts_int8"
    stage = "compress"
    tolerance = {torch.float32: 0.05}

    def apply(self, model, inputs):
        n = 0
        for mod in list(model.modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(mod, cname, Int8Linear(child))
                    n += 1
        return model, {"replaced": n}


@dataclass
class Calibrate(Transform):
    """Records the output range on the example inputs as a buffer: data-dependent, so replay must overwrite it."""

    name = "ts_calibrate"
    stage = "compress"
    needs_inputs = True

    def apply(self, model, inputs):
        args, kwargs = inputs
        with torch.no_grad():
            model.register_buffer("out_absmax", model(*args, **kwargs).abs().amax().reshape(1))
        return model, {}


@dataclass
class Trace(Transform):
    name = "ts_trace"
    stage = "fuse"
    scale: float = 1.0

    def apply(self, model, inputs):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(self.scale)
        tracer = torch.fx.Tracer()
        tracer.proxy_buffer_attributes = True
        gm = torch.fx.GraphModule(model, tracer.trace(model))
        return gm, {"nodes": len(gm.graph.nodes)}


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_transformed_model_round_trips_bit_exactly(tmp_path):
    x = torch.randn(5, 8)
    model = Net().eval()
    model = QuantizeLinears()(model, x)
    model = Calibrate()(model, {"x": x})
    model = Trace(scale=1.5)(model)
    assert isinstance(model, torch.fx.GraphModule)
    save(model, tmp_path / "m")
    loaded = load(Net(), tmp_path / "m")
    assert isinstance(loaded, torch.fx.GraphModule) and not loaded.training
    assert_same_state(model, loaded)
    assert loaded.fc1.qweight.dtype == torch.int8
    assert torch.equal(model(x), loaded(x))
    assert history(loaded) == history(model)
    assert loaded._dsx_origin == model._dsx_origin == f"{Net.__module__}.Net"


def test_saved_files_are_safetensors_and_readable_json(tmp_path):
    x = torch.randn(2, 8)
    model = Calibrate()(QuantizeLinears()(Net().eval(), x), x)
    out = save(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["dsx.json", "model.safetensors"]
    meta = json.loads((out / "dsx.json").read_text())
    assert meta["format"] == "dsx" and meta["version"] == 1 and meta["origin"].endswith(".Net")
    assert [e["transform"] for e in meta["history"]] == ["ts_int8", "ts_calibrate"]
    assert meta["history"][1]["inputs"]["leaves"] == [{"shape": [2, 8], "dtype": "float32"}]
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    assert torch.equal(weights["fc1.qweight"], model.fc1.qweight)
    loaded = load(Net(), out)
    assert_same_state(model, loaded)
    assert torch.equal(loaded.out_absmax, model.out_absmax)


def test_no_pickle_is_used(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for mod, fn in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, fn, refuse)
    model = QuantizeLinears()(Net())
    loaded = load(Net(), save(model, tmp_path / "m"))
    assert_same_state(model, loaded)


def test_tied_and_non_contiguous_tensors(tmp_path):
    model = Tied()
    assert not model.table.is_contiguous()
    save(model, tmp_path / "t")
    loaded = load(Tied(), tmp_path / "t")
    assert loaded.head.weight is loaded.emb.weight
    assert_same_state(model, loaded)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids), loaded(ids))


def test_tied_weights_survive_a_transform(tmp_path):
    model = Trace(scale=2.0)(Tied())
    save(model, tmp_path / "t")
    loaded = load(Tied(), tmp_path / "t")
    assert_same_state(model, loaded)
    ids = torch.tensor([[0, 9]])
    assert torch.equal(model(ids), loaded(ids))


def test_plain_model_round_trips(tmp_path):
    model = Net()
    save(model, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "dsx.json").read_text())["history"] == []
    loaded = load(Net(), tmp_path / "p")
    assert_same_state(model, loaded)
    assert history(loaded) == [] and loaded.training


def test_wrong_class_is_refused(tmp_path):
    save(Net(), tmp_path / "n")
    with pytest.raises(ValueError, match=r"\.Net.*\.Other"):
        load(Other(), tmp_path / "n")


def test_already_transformed_model_is_refused(tmp_path):
    save(Net(), tmp_path / "n")
    with pytest.raises(ValueError, match="fresh instance"):
        load(QuantizeLinears()(Net()), tmp_path / "n")


def test_mismatched_weights_name_the_file(tmp_path):
    save(Net(d=8), tmp_path / "n")
    with pytest.raises(ValueError, match="model.safetensors"):
        load(Net(d=3), tmp_path / "n")


def test_missing_and_malformed_saves(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        load(Net(), tmp_path / "nothing")
    d = save(Net(), tmp_path / "n")
    (d / "dsx.json").write_text("{not json")
    with pytest.raises(ValueError, match="dsx.json"):
        load(Net(), d)
    (d / "dsx.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="not a dsx save"):
        load(Net(), d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(Net(), d)


def test_non_json_history_is_refused(tmp_path):
    model = Net()
    model._dsx_history = [{"transform": "x", "config": {"dtype": torch.float16}}]
    with pytest.raises(ValueError, match="JSON"):
        save(model, tmp_path / "bad")
    with pytest.raises(TypeError, match="nn.Module"):
        save("model", tmp_path / "bad")


class Crash(BaseException):
    """A process dying mid-save (BaseException: no ``except Exception`` in dsx may swallow it)."""


def _write_points(monkeypatch, crash_at):
    """Make the ``crash_at``-th write step of a save (weights, fsync, metadata, rename) raise ``Crash``; returns the
    list the steps are counted in."""
    import os

    import dsx.core.atomic as atomic
    import dsx.core.serialize as serialize

    calls = []

    def counted(fn):
        def step(*args, **kwargs):
            calls.append(fn.__name__)
            if len(calls) - 1 == crash_at:
                if fn.__name__ in ("save_model", "write_bytes"):  # torn: half a file reached the disk
                    Path(args[1] if fn.__name__ == "save_model" else args[0]).write_bytes(b"torn")
                raise Crash(fn.__name__)
            return fn(*args, **kwargs)
        return step

    monkeypatch.setattr(serialize, "save_model", counted(serialize.save_model))
    monkeypatch.setattr(atomic, "write_bytes", counted(atomic.write_bytes))
    monkeypatch.setattr(serialize, "write_bytes", atomic.write_bytes)
    monkeypatch.setattr(os, "fsync", counted(os.fsync))
    monkeypatch.setattr(os, "rename", counted(os.rename))
    return calls


def test_a_crash_between_any_two_writes_leaves_a_complete_save(tmp_path, monkeypatch):
    old, new = Net(), Net()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    save(old, tmp_path / "m")
    with monkeypatch.context() as m:
        calls = _write_points(m, crash_at=-1)
        save(new, tmp_path / "m")  # replacing a save: weights, 3 fsyncs, metadata, 2 renames, fsync
        steps = len(calls)
    assert steps >= 6 and calls.count("rename") == 2
    for crash_at in range(steps):
        save(old, tmp_path / "m")
        with monkeypatch.context() as m:
            _write_points(m, crash_at)
            with pytest.raises(Crash):
                save(new, tmp_path / "m")
        got = load(Net(), tmp_path / "m")
        assert_same_state(got, old) if torch.equal(got.fc1.weight, old.fc1.weight) else assert_same_state(got, new)
        save(new, tmp_path / "m")  # the next save recovers and replaces it
        assert_same_state(load(Net(), tmp_path / "m"), new)
        assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no partial or previous copy is left


def test_save_refuses_a_foreign_directory_unless_overwrite(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="path: .* is a non-empty directory that is not a dsx save; pass overwrite"):
        save(Net(), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    save(Net(), tmp_path / "mine", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["dsx.json", "model.safetensors"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="path: .* is a file"):
        save(Net(), tmp_path / "file")
    with pytest.raises(TypeError, match="overwrite: expected True or False"):
        save(Net(), tmp_path / "other", overwrite="yes")
    (tmp_path / "empty").mkdir()
    assert save(Net(), tmp_path / "empty") == tmp_path / "empty"


def test_a_dtype_mismatch_is_refused_unless_dtype_is_given(tmp_path):
    model = Net().double()
    save(model, tmp_path / "m")
    with pytest.raises(ValueError, match=r"holds fc1.weight as torch.float64, the rebuilt model has torch.float32"):
        load(Net(), tmp_path / "m")
    got = load(Net(), tmp_path / "m", dtype=torch.float32)
    assert got.fc1.weight.dtype == torch.float32 and torch.equal(got.fc1.weight, model.fc1.weight.float())
    with pytest.raises(TypeError, match="dtype: expected a floating torch.dtype"):
        load(Net(), tmp_path / "m", dtype="float32")


def test_a_failed_load_leaves_the_fresh_model_unchanged(tmp_path):
    x = torch.randn(2, 8)
    save(QuantizeLinears()(Net(), x), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    fresh = Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="model.safetensors is corrupt or truncated"):
        load(fresh, tmp_path / "m")
    assert history(fresh) == [] and all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    save(QuantizeLinears()(Net(), x), tmp_path / "n")
    meta = json.loads((tmp_path / "n" / "dsx.json").read_text())
    weights = (tmp_path / "n" / "model.safetensors").read_bytes()
    (tmp_path / "n" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load(fresh, tmp_path / "n")
    (tmp_path / "n" / "model.safetensors").write_bytes(weights)
    meta["history"][0]["config"] = {"no_such_field": 1}
    (tmp_path / "n" / "dsx.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"history entry 0 \(ts_int8\) cannot be replayed: TypeError"):
        load(fresh, tmp_path / "n")
    assert history(fresh) == [] and type(fresh.fc1) is nn.Linear


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("origin"), "'origin' is missing or not a str"),
    (lambda m: m.update(training="yes"), "'training' is missing or not a bool"),
    (lambda m: m.update(history={}), "'history' is missing or not a list"),
    (lambda m: m["history"].append({"transform": 3}), "history entry 2 needs 'transform'"),
    (lambda m: m["history"][0].update(transform="nope"), "unknown transform 'nope'"),
    (lambda m: m["history"][0].update(inputs={"leaves": [{"dtype": "load", "shape": [2]}], "tree": "x"}),
     "'load' is not a torch dtype"),
    (lambda m: m["history"][0].update(inputs={"leaves": [{"dtype": "float32", "shape": [1 << 20, 1 << 20]}],
                                              "tree": "x"}), "more than"),
])
def test_a_corrupt_dsx_json_is_a_clear_error(tmp_path, edit, match):
    x = torch.randn(2, 8)
    d = save(Calibrate()(QuantizeLinears()(Net().eval(), x), x), tmp_path / "m")
    meta = json.loads((d / "dsx.json").read_text())
    edit(meta)
    (d / "dsx.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        load(Net(), d)
