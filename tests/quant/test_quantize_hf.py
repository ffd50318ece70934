"""dsx.quantize on Hugging Face models built from configs: accuracy of the last hidden state vs float."""

import pytest
import torch

import dsx
from dsx.quant.linear import fp8_supported
from tests.hf_models import tiny_hf

MODELS = ["bert", "gpt2", "llama"]


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fmt, bound", [("int8", 0.99), ("int8_weight_only", 0.99), ("fp8", 0.98)])
def test_last_hidden_state_stays_close(name, fmt, bound, tmp_path):
    if fmt == "fp8" and (reason := fp8_supported(torch.device("cpu"))):
        pytest.skip(reason)
    model, inputs = tiny_hf(name)
    q = dsx.quantize(model, fmt, example_inputs=inputs, progress=False)
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
        out = q(**inputs).last_hidden_state
    assert cosine(out, ref) >= bound
    assert dsx.history(q)[-1]["info"]["quantized"] >= 8
    dsx.save(q, tmp_path / "q")
    again = dsx.load(tiny_hf(name)[0], tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(**inputs).last_hidden_state, out)


@pytest.mark.parametrize("name", MODELS)
def test_static_int8_with_smoothquant(name):
    model, inputs = tiny_hf(name)
    g = torch.Generator().manual_seed(1)
    calib = [{**inputs, "input_ids": torch.randint(0, 100, inputs["input_ids"].shape, generator=g)} for _ in range(2)]
    q = dsx.quantize(model, dsx.quant.Int8Static(observer="percentile", smoothquant=0.5), calibration=calib,
                     example_inputs=inputs, progress=False)
    with torch.no_grad():
        assert cosine(q(**inputs).last_hidden_state, model(**inputs).last_hidden_state) >= 0.98
