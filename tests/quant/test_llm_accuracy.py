"""Accuracy of the LLM formats on real text: held-out perplexity of the tiny trained Llama fixture after int8 and
int8_w7, int4 RTN / HQQ / GPTQ, and greedy-token agreement of int8 with fp32."""

import pytest
import torch

import dsx
from benchmarks.tiny_lm import encode, heldout_text, load, perplexity, prompts
from dsx.quant import Int4WeightOnly

pytest.importorskip("transformers")
EVAL_BYTES = 8192
CALIB_FROM, CALIB_BATCHES, CALIB_LEN = 16384, 4, 256


@pytest.fixture(scope="module")
def model():
    return load()


@pytest.fixture(scope="module")
def text():
    return heldout_text()[:EVAL_BYTES]


@pytest.fixture(scope="module")
def fp32_ppl(model, text):
    return perplexity(model, text)


def calibration():
    ids = encode(heldout_text()[CALIB_FROM:])
    return [ids[i * CALIB_LEN:(i + 1) * CALIB_LEN].view(1, -1) for i in range(CALIB_BATCHES)]


@pytest.mark.parametrize("fmt", ["int8", "int8_w7"])
def test_int8_perplexity_within_1_percent(model, text, fp32_ppl, fmt):
    ppl = perplexity(dsx.quantize(model, fmt, progress=False), text)
    print(f"fp32 {fp32_ppl:.4f} {fmt} {ppl:.4f}")
    assert ppl <= 1.01 * fp32_ppl


def test_int4_gptq_and_hqq_beat_rtn(model, text, fp32_ppl):
    rtn = perplexity(dsx.quantize(model, Int4WeightOnly(algorithm="rtn"), progress=False), text)
    hqq = perplexity(dsx.quantize(model, Int4WeightOnly(algorithm="hqq"), progress=False), text)
    gptq_model = dsx.quantize(model, Int4WeightOnly(algorithm="gptq"), calibration=calibration(), progress=False)
    gptq = perplexity(gptq_model, text)
    print(f"group 128: fp32 {fp32_ppl:.4f} rtn {rtn:.4f} hqq {hqq:.4f} gptq {gptq:.4f}")
    assert fp32_ppl < gptq < rtn and hqq < rtn
    assert gptq <= 1.05 * fp32_ppl and hqq <= 1.08 * fp32_ppl
    assert dsx.history(gptq_model)[-1]["info"]["quantized"] == 7 * model.config.num_hidden_layers + 1


def test_gptq_rejects_nan_calibration():
    net = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    bad = [torch.randn(4, 128), torch.full((4, 128), float("nan"))]
    with pytest.raises(ValueError, match="calibration"):
        dsx.quantize(net, Int4WeightOnly(group_size=64, algorithm="gptq"), calibration=bad, progress=False)
    assert isinstance(net[0], torch.nn.Linear) and torch.isfinite(net[0].weight).all()


def test_int8_greedy_tokens_match_fp32(model):
    ids = encode(prompts()[0]).view(1, -1)
    kw = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)[0, ids.shape[1]:]
    out = dsx.quantize(model, "int8", progress=False).generate(ids, **kw)[0, ids.shape[1]:]
    agree = (ref == out).float().mean().item()
    print(f"int8 greedy agreement over 64 tokens: {agree:.3f}")
    assert agree >= 0.9
