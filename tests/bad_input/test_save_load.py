"""Bad input to dsx.save / dsx.load: wrong arguments, missing paths and corrupt saves made here in tmp_path. Each
is refused with an error naming the argument (or the file), the files on disk are left as they were, and the
caller's model is left exactly as it was."""

import json
import re

import pytest
import torch
import torch.nn as nn

import dsx
from tests.bad_input.conftest import BAD, assert_refused, assert_untouched, convnet, mlp, snapshot, tree_digest

pytestmark = pytest.mark.timeout(60)



def transformed():
    return dsx.prune(mlp(), 0.5)


def bad_history():
    m = mlp()
    m._dsx_history = [{"transform": "prune", "stage": "prune", "config": {}, "inputs": None, "info": {"x": object()}}]
    return m


def save_case(id, call, match, exc=BAD, make=mlp):
    return pytest.param(make, call, exc, match, id=id)


SAVE_CASES = [
    save_case("model-str", lambda m, p: dsx.save("model", p / "new"), "model"),
    save_case("model-state_dict", lambda m, p: dsx.save(m.state_dict(), p / "new"), "model"),
    save_case("overwrite-str", lambda m, p: dsx.save(m, p / "new", overwrite="yes"), "overwrite"),
    save_case("overwrite-int", lambda m, p: dsx.save(m, p / "new", overwrite=1), "overwrite"),
    save_case("path-is-a-file", lambda m, p: dsx.save(m, p / "file.txt"), "path"),
    save_case("path-non-dsx-directory", lambda m, p: dsx.save(m, p / "photos"), "path"),
    save_case("history-not-json", lambda m, p: dsx.save(m, p / "new"), "history", make=bad_history),
]


@pytest.mark.parametrize("make, call, exc, match", SAVE_CASES)
def test_save_refused(make, call, exc, match, tmp_path):
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    before = tree_digest(tmp_path)
    assert_refused(make(), call, exc, match, tmp_path)
    assert tree_digest(tmp_path) == before, "a refused save changed the files"


def _meta(path):
    return json.loads((path / "dsx.json").read_text())


def _set_meta(path, meta):
    (path / "dsx.json").write_text(json.dumps(meta) if not isinstance(meta, str) else meta)


def corrupt(kind, path):
    """Damage the save at ``path`` in one way."""
    if kind == "meta-not-json":
        _set_meta(path, "{not json")
    elif kind == "meta-binary":
        (path / "dsx.json").write_bytes(b"\xff\xfe\x00garbage")
    elif kind == "meta-list":
        _set_meta(path, [1, 2])
    elif kind == "meta-wrong-format":
        _set_meta(path, {**_meta(path), "format": "other"})
    elif kind == "meta-wrong-version":
        _set_meta(path, {**_meta(path), "version": 99})
    elif kind == "meta-history-not-list":
        _set_meta(path, {**_meta(path), "history": {"transform": "prune"}})
    elif kind == "meta-training-str":
        _set_meta(path, {**_meta(path), "training": "no"})
    elif kind == "meta-origin-missing":
        meta = _meta(path)
        del meta["origin"]
        _set_meta(path, meta)
    elif kind == "meta-history-entry-not-dict":
        _set_meta(path, {**_meta(path), "history": ["prune"]})
    elif kind == "meta-history-unknown-transform":
        _set_meta(path, {**_meta(path), "history": [{"transform": "teleport", "config": {}, "inputs": None}]})
    elif kind == "meta-history-bad-config":
        _set_meta(path, {**_meta(path), "history": [{"transform": "prune", "config": {"amount": 7}, "inputs": None}]})
    elif kind == "meta-history-bad-inputs-dtype":
        inputs = {"leaves": [{"shape": [2, 64], "dtype": "float99"}], "tree": "x"}
        _set_meta(path, {**_meta(path), "history": [{"transform": "prune", "config": {"amount": 0.5},
                                                      "inputs": inputs}]})
    elif kind == "meta-origin-other-class":
        _set_meta(path, {**_meta(path), "origin": "dsx.models.TinyGPT"})
    elif kind == "weights-truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "weights-garbage":
        (path / "model.safetensors").write_bytes(b"\x00" * 64)
    elif kind == "weights-empty":
        (path / "model.safetensors").write_bytes(b"")


CORRUPT = ["meta-not-json", "meta-binary", "meta-list", "meta-wrong-format", "meta-wrong-version",
           "meta-history-not-list", "meta-training-str", "meta-origin-missing", "meta-history-entry-not-dict",
           "meta-history-unknown-transform", "meta-history-bad-config", "meta-history-bad-inputs-dtype",
           "meta-origin-other-class", "weights-truncated", "weights-garbage", "weights-empty"]


@pytest.mark.parametrize("kind", CORRUPT)
def test_load_corrupt(kind, tmp_path):
    path = dsx.save(mlp(), tmp_path / "saved")
    corrupt(kind, path)
    before = tree_digest(tmp_path)
    model = mlp()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        dsx.load(model, path)
    assert_untouched(model, snap)
    assert tree_digest(tmp_path) == before, "a refused load changed the files"


@pytest.mark.parametrize("missing", ["dsx.json", "model.safetensors", "directory"])
def test_load_missing(missing, tmp_path):
    path = dsx.save(mlp(), tmp_path / "saved")
    if missing == "directory":
        path = tmp_path / "nowhere"
    else:
        (path / missing).unlink()
    model = mlp()
    snap = snapshot(model)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        dsx.load(model, path)
    assert_untouched(model, snap)


def load_case(id, make, call, match, exc=BAD, saved=mlp):
    return pytest.param(saved, make, call, exc, match, id=id)


LOAD_CASES = [
    load_case("model-str", mlp, lambda m, p: dsx.load("model", p), "model"),
    load_case("model-None", mlp, lambda m, p: dsx.load(None, p), "model"),
    load_case("model-already-transformed", transformed, lambda m, p: dsx.load(m, p), "model"),
    load_case("model-other-architecture", convnet, lambda m, p: dsx.load(m, p), "model|weights"),
    load_case("model-other-dtype", lambda: mlp().double(), lambda m, p: dsx.load(m, p), "dtype"),
    load_case("model-other-class", lambda: nn.Linear(64, 32), lambda m, p: dsx.load(m, p), "model|Sequential"),
    load_case("dtype-str", mlp, lambda m, p: dsx.load(m, p, dtype="float16"), "dtype"),
    load_case("dtype-int-dtype", mlp, lambda m, p: dsx.load(m, p, dtype=torch.int8), "dtype"),
    load_case("dtype-bool", mlp, lambda m, p: dsx.load(m, p, dtype=True), "dtype"),
    load_case("path-is-a-file", mlp, lambda m, p: dsx.load(m, p / "model.safetensors"), "model.safetensors",
              exc=FileNotFoundError),
]


@pytest.mark.parametrize("saved, make, call, exc, match", LOAD_CASES)
def test_load_refused(saved, make, call, exc, match, tmp_path):
    path = dsx.save(saved(), tmp_path / "saved")
    before = tree_digest(tmp_path)
    assert_refused(make(), call, exc, match, path)
    assert tree_digest(tmp_path) == before, "a refused load changed the files"
