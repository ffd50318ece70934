"""Bad input to dsx.export and dsx.export.pt2.load_pt2: a clear error naming the argument (or the file), nothing
written where the call was refused, and the caller's model left exactly as it was."""

import re
import zipfile

import pytest
import torch

import dsx
from dsx.export.pt2 import load_pt2
from tests.bad_input.conftest import Raising, assert_refused, case, mlp, nan_x, tree_digest, x

pytestmark = pytest.mark.timeout(60)



def qat_model():
    return dsx.quantize(mlp().train(), "int8", qat=True, progress=False)


def one_row():
    return x()[:1]


def tiny_lm(kind="llama"):
    transformers = pytest.importorskip("transformers")
    if kind == "t5":
        cfg = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=100)
        return transformers.T5ForConditionalGeneration(cfg).eval()
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=64, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


def ids():
    return torch.randint(0, 100, (2, 5))



CASES = [
    # model
    case("model-str", lambda m, p: dsx.export("model", x(), p / "m.onnx"), "model"),
    case("model-list", lambda m, p: dsx.export([m], x(), p / "m.pt2"), "model"),
    case("model-qat-to-onnx", lambda m, p: dsx.export(m, x(), p / "m.onnx"), "model", make=qat_model),
    # example_inputs
    case("example_inputs-None", lambda m, p: dsx.export(m, None, p / "m.onnx"), "example_inputs"),
    case("example_inputs-str", lambda m, p: dsx.export(m, "x", p / "m.onnx"), "example_inputs"),
    case("example_inputs-empty", lambda m, p: dsx.export(m, [], p / "m.pt2"), "example_inputs"),
    case("example_inputs-nan", lambda m, p: dsx.export(m, nan_x(), p / "m.onnx"), "example_inputs"),
    case("example_inputs-inf-pt2", lambda m, p: dsx.export(m, x() / 0, p / "m.pt2"), "example_inputs"),
    case("example_inputs-int-keys", lambda m, p: dsx.export(m, {1: x()}, p / "m.pt2"), "example_inputs"),
    # path / format
    case("path-no-suffix", lambda m, p: dsx.export(m, x(), p / "model"), "path"),
    case("path-unknown-suffix", lambda m, p: dsx.export(m, x(), p / "model.tflite"), "path"),
    case("path-empty", lambda m, p: dsx.export(m, x(), ""), "path"),
    case("format-unknown", lambda m, p: dsx.export(m, x(), p / "model", format="tflite"), "format"),
    case("format-int", lambda m, p: dsx.export(m, x(), p / "model", format=1), "format"),
    case("format-disagrees-with-suffix", lambda m, p: dsx.export(m, x(), p / "m.onnx", format="pt2"), "format"),
    # opset / precision
    case("opset-for-pt2", lambda m, p: dsx.export(m, x(), p / "m.pt2", opset=18), "opset"),
    case("opset-too-old", lambda m, p: dsx.export(m, x(), p / "m.onnx", opset=11), "opset"),
    case("opset-negative", lambda m, p: dsx.export(m, x(), p / "m.onnx", opset=-1), "opset"),
    case("opset-str", lambda m, p: dsx.export(m, x(), p / "m.onnx", opset="18"), "opset"),
    case("opset-float", lambda m, p: dsx.export(m, x(), p / "m.onnx", opset=18.0), "opset"),
    case("opset-bool", lambda m, p: dsx.export(m, x(), p / "m.onnx", opset=True), "opset"),
    case("precision-for-onnx", lambda m, p: dsx.export(m, x(), p / "m.onnx", precision="fp16"), "precision"),
    case("precision-unknown", lambda m, p: dsx.export(m, x(), p / "m.engine", precision="int4"), "precision"),
    case("precision-int8", lambda m, p: dsx.export(m, x(), p / "m.engine", precision="int8"), "precision"),
    # dynamic_shapes
    case("dynamic_shapes-batch-of-one-onnx", lambda m, p: dsx.export(m, one_row(), p / "m.onnx",
                                                                      dynamic_shapes="batch"), "dynamic_shapes"),
    case("dynamic_shapes-batch-of-one-pt2", lambda m, p: dsx.export(m, one_row(), p / "m.pt2",
                                                                     dynamic_shapes="batch"), "dynamic_shapes"),
    case("example_inputs-wrong-shape-pt2", lambda m, p: dsx.export(m, torch.randn(4, 7), p / "m.pt2"),
         "example_inputs"),
    case("example_inputs-wrong-shape-onnx", lambda m, p: dsx.export(m, torch.randn(4, 7), p / "m.onnx"),
         "example_inputs"),
    case("model-raises-pt2", lambda m, p: dsx.export(m, x(), p / "m.pt2"), "example_inputs|model", make=Raising),
    # kv_cache
    case("kv_cache-str", lambda m, p: dsx.export(m, ids(), p / "m.onnx", kv_cache="yes"), "kv_cache", TypeError,
         make=tiny_lm),
    case("kv_cache-for-pt2", lambda m, p: dsx.export(m, ids(), p / "m.pt2", kv_cache=True), "kv_cache",
         make=tiny_lm),
    case("kv_cache-not-a-decoder", lambda m, p: dsx.export(m, x(), p / "m.onnx", kv_cache=True), "model"),
    case("kv_cache-encoder-decoder", lambda m, p: dsx.export(m, ids(), p / "m.onnx", kv_cache=True), "model",
         make=lambda: tiny_lm("t5")),
    case("kv_cache-float-ids", lambda m, p: dsx.export(m, torch.randn(2, 5), p / "m.onnx", kv_cache=True),
         "example_inputs", make=tiny_lm),
    case("kv_cache-dynamic_shapes", lambda m, p: dsx.export(m, ids(), p / "m.onnx", kv_cache=True,
                                                            dynamic_shapes="batch"), "dynamic_shapes", make=tiny_lm),
    case("example_inputs-use_cache", lambda m, p: dsx.export(m, {"input_ids": ids(), "use_cache": True},
                                                             p / "m.onnx"), "example_inputs.*kv_cache=True",
         make=tiny_lm),
]


@pytest.mark.parametrize("make, call, exc, match", CASES)
def test_refused(make, call, exc, match, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "dir.pt2").mkdir()
    before = tree_digest(tmp_path)
    assert_refused(make(), call, exc, match, tmp_path)
    assert tree_digest(tmp_path) == before, "a refused export wrote files"


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _write(kind, path):
    if kind == "garbage":
        path.write_bytes(b"\x00not a zip archive\xff" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zip-without-archive-version":
        _zip(path, {"model/data.json": "{}"})
    elif kind == "zip-with-pickled-object":
        _zip(path, {"model/archive_version": "0", "model/constants/custom_obj_0.pt": b"junk"})
    elif kind == "zip-with-compiled-code":
        _zip(path, {"model/archive_version": "0", "model/data/aotinductor/model.so": b"\x7fELF"})
    elif kind == "zip-with-unsafe-pickle":
        import pickle

        _zip(path, {"model/archive_version": "0", "model/data/sample_inputs/model.pt": pickle.dumps(print)})


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the crafted pickle, before refusing it
@pytest.mark.parametrize("kind", ["garbage", "empty", "zip-without-archive-version", "zip-with-pickled-object",
                                  "zip-with-compiled-code", "zip-with-unsafe-pickle"])
def test_load_pt2_corrupt(kind, tmp_path):
    path = tmp_path / "m.pt2"
    _write(kind, path)
    before = tree_digest(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_pt2(path)
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("where", ["missing", "directory"])
def test_load_pt2_not_a_file(where, tmp_path):
    path = tmp_path / "m.pt2"
    if where == "directory":
        path.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_pt2(path)
