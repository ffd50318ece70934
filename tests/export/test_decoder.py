"""Hugging Face decoders to ONNX: default configs export without their cache, and ``kv_cache=True`` writes a
"with past" decoder that onnxruntime decodes greedily to the same tokens as PyTorch's ``generate``."""

import pytest
import torch

import dsx
from dsx.core.transform import VerificationError
from dsx.export.decoder import export_decoder_onnx, positions
from dsx.export.onnx import run_onnx

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def decoder(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=100, eos_token_id=0, bos_token_id=0)
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=8, **common)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


def prompt() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding, as batched generate() pads
    return {"input_ids": torch.randint(1, 100, (2, 6)), "attention_mask": mask}


def ort_greedy(path, inputs, steps):
    """Free-running greedy decoding in onnxruntime alone, from an empty past."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    specs = {i.name: i for i in session.get_inputs()}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    feeds = {n: torch.zeros(2, s.shape[1], 0, s.shape[3]) for n, s in specs.items() if n.startswith("past")}
    out = []
    for _ in range(steps):
        feeds.update(input_ids=ids, attention_mask=mask, position_ids=positions(mask, ids.shape[1]))
        result = session.run(None, {n: feeds[n].numpy() for n in specs})
        ids = torch.from_numpy(result[0])[:, -1].argmax(-1, keepdim=True)
        out.append(ids)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        names = [o.name for o in session.get_outputs()][1:]
        feeds.update({n.replace("present", "past_key_values"): torch.from_numpy(r) for n, r in zip(names, result[1:])})
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mistral"])
def test_kv_cache_decodes_like_generate(kind, tmp_path):
    model, inputs = decoder(kind), prompt()
    result = dsx.export(model, inputs, tmp_path / "m.onnx", kv_cache=True)
    assert any("same tokens" in n for n in result.notes) and result.max_rel < 1e-4
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0  # decode all 16 steps
    want = model.generate(**inputs, max_new_tokens=16, do_sample=False)[:, 6:]
    assert torch.equal(ort_greedy(tmp_path / "m.onnx", inputs, 16), want)


def test_kv_cache_quantized_by_cosine(tmp_path):
    model = dsx.quantize(decoder("llama"), "int8", progress=False)
    result = dsx.export(model, prompt(), tmp_path / "m.onnx", kv_cache=True)
    assert any("cosine" in n for n in result.notes) and any("greedy tokens" in n for n in result.notes)


def test_kv_cache_drift_is_an_error_and_model_untouched(tmp_path):
    model = decoder("llama").train()
    with pytest.raises(VerificationError, match="decoding logits"):
        export_decoder_onnx(model, torch.randint(1, 100, (1, 3)), tmp_path / "m.onnx", rtol=1e-12, steps=2)
    assert model.training


@pytest.mark.parametrize("steps", [0, -1, 2.0, "4"])
def test_kv_cache_bad_steps(steps, tmp_path):
    with pytest.raises(ValueError, match="steps"):
        export_decoder_onnx(decoder("llama"), prompt(), tmp_path / "m.onnx", steps=steps)
    assert not (tmp_path / "m.onnx").exists()


def test_default_config_decoder_exports_without_cache(tmp_path):
    model = decoder("llama")
    assert model.config.use_cache
    result = dsx.export(model, prompt(), tmp_path / "m.onnx", dynamic_shapes="batch")
    assert any("use_cache=False" in n for n in result.notes) and result.max_rel < 1e-4
    assert model.config.use_cache
    wide = {"input_ids": torch.randint(1, 100, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    got = run_onnx(tmp_path / "m.onnx", wide)[0]
    assert torch.allclose(got, model(**wide).logits, atol=1e-5)
