"""The tiny pretrained byte-level Llama fixture (benchmarks/tiny_lm.py): it loads, has learned English, helpers work."""

import string

import pytest
import torch
import torch.nn as nn

from benchmarks.tiny_lm import (FIXTURE, config, decode, encode, generate, heldout_text, load, perplexity,
                                prompts)

TRAINED_PPL_16K = 3.90  # fp32 perplexity of the fixture on the first 16K held-out bytes, when it was built
TOKENS = 16384


@pytest.fixture(scope="module")
def model():
    return load()


def test_fixture_files_are_safetensors_and_small():
    files = {p.name for p in FIXTURE.iterdir()}
    assert {"config.json", "model.safetensors", "heldout.txt", "prompts.txt"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    assert (FIXTURE / "model.safetensors").stat().st_size <= 8 * 2**20
    assert 32_000 <= len(heldout_text()) <= 64_000 and heldout_text().isascii()


def test_config_fits_int4_groups(model):
    cfg = model.config
    assert cfg.vocab_size == 256 and not cfg.tie_word_embeddings
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 7 * cfg.num_hidden_layers + 1
    assert all(m.in_features % 128 == 0 and m.weight.dtype == torch.float32 for m in linears)
    assert not model.training


def test_heldout_perplexity_is_that_of_a_trained_model(model):
    ppl = perplexity(model, heldout_text(), max_tokens=TOKENS)
    assert ppl < TRAINED_PPL_16K * 1.05 and ppl < 0.5 * 256
    torch.manual_seed(0)
    untrained = type(model)(config()).eval()
    assert perplexity(untrained, heldout_text(), max_tokens=4096) > 100 > 2 * TRAINED_PPL_16K


def test_perplexity_accepts_ids_tensor_models_and_strides(model):
    ids = encode(heldout_text())[:2048]

    class Plain(nn.Module):  # returns a bare logits tensor, like a traced / quantized wrapper might
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x).logits

    ppl = perplexity(model, ids)
    assert perplexity(Plain(), ids) == pytest.approx(ppl, rel=1e-5)
    assert perplexity(model, decode(ids)) == pytest.approx(ppl, rel=1e-6)
    assert perplexity(model, ids, seq_len=256, stride=128) < ppl  # more context per target


def test_greedy_generation_is_printable_english(model):
    for prompt in prompts()[:2]:
        out = generate(model, prompt, max_new_tokens=32)
        assert len(out) == 32 and all(c in string.printable for c in out), repr(out)
        assert " " in out and sum(c.isalpha() for c in out) >= 16, repr(out)


def test_tokenizer_round_trips():
    text = heldout_text()[:5000]
    ids = encode(text)
    assert ids.dtype == torch.int64 and ids.numel() == len(text) and int(ids.max()) < 256
    assert decode(ids) == text and decode(ids.tolist()) == text
    assert decode(encode("caf\u00e9 ok")) == "caf ok"  # non-ASCII is dropped


@pytest.mark.parametrize("kwargs", [{"seq_len": 0}, {"seq_len": 64, "stride": 65}, {"stride": 0},
                                    {"seq_len": 1024}, {"batch_size": 0}])
def test_perplexity_rejects_bad_windows(model, kwargs):
    with pytest.raises(ValueError):
        perplexity(model, heldout_text()[:1000], **kwargs)


@pytest.mark.parametrize("text", ["", "a"])
def test_perplexity_rejects_too_short_text(model, text):
    with pytest.raises(ValueError):
        perplexity(model, text)
