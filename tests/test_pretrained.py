"""Hugging Face folders in and out: save_pretrained folders load (safetensors only, no custom code), dsx saves of
Hugging Face models are folders transformers reads and dsx.from_pretrained rebuilds bit-exactly."""

import json

import pytest
import torch

import dsx
from dsx.pretrained import hf_example_inputs

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=100)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    llama().save_pretrained(path)
    return path


def test_a_save_pretrained_folder_loads_with_its_class_or_the_task_head(folder):
    ids = torch.randint(0, 100, (2, 7))
    model = dsx.from_pretrained(folder)
    assert type(model) is transformers.LlamaForCausalLM and not model.training
    assert torch.equal(model(ids).logits, llama()(ids).logits)
    assert type(dsx.from_pretrained(folder, task="base")) is transformers.LlamaModel


def test_a_dsx_save_is_a_folder_transformers_reads(tmp_path):
    model = llama()
    dsx.save(model, tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and (tmp_path / "s" / "generation_config.json").is_file()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    ids = torch.randint(0, 100, (2, 5))
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_a_quantized_save_rebuilds_bit_exactly(folder, tmp_path):
    quantized = dsx.quantize(dsx.from_pretrained(folder), "int8", progress=False)
    dsx.save(quantized, tmp_path / "q")
    again = dsx.from_pretrained(tmp_path / "q")
    assert [e["transform"] for e in dsx.history(again)] == ["quantize"]
    ids = torch.randint(0, 100, (2, 9))
    assert torch.equal(again(ids).logits, quantized(ids).logits)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), quantized.state_dict().values()))


def test_example_inputs_come_from_the_config():
    text = hf_example_inputs(llama(), batch=3, seq=5)
    assert text["input_ids"].shape == (3, 5) and int(text["input_ids"].max()) < 100
    assert torch.equal(text["attention_mask"], torch.ones(3, 5, dtype=torch.long))
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64, image_size=24, patch_size=8))
    assert hf_example_inputs(vit)["pixel_values"].shape == (2, 3, 24, 24)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                                                       d_kv=16, vocab_size=100))
    assert set(hf_example_inputs(t5)) == {"input_ids", "attention_mask", "decoder_input_ids"}
    with pytest.raises(ValueError, match="no Hugging Face config"):
        hf_example_inputs(torch.nn.Linear(2, 2))


def _folder(path, config, files=()):
    path.mkdir(parents=True)
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for name in files:
        (path / name).write_bytes(b"\x80\x04junk")
    return path


@pytest.mark.parametrize("case, exc, match", [
    ("task", ValueError, "task"), ("missing", FileNotFoundError, "no config.json"), ("not-a-path", TypeError, "folder"),
    ("pickle-only", ValueError, "safetensors only"), ("auto_map", ValueError, "custom model code"),
    ("bad-json", ValueError, "not a readable JSON"), ("unknown-class", ValueError, "'Nope'"),
    ("foreign-dsx-save", ValueError, "not a transformers class"),
])
def test_bad_folders_and_arguments_are_clear_errors(case, exc, match, folder, tmp_path):
    config, where, task = json.loads((folder / "config.json").read_text()), tmp_path / case, "auto"
    if case == "task":
        where, task = folder, "translation"
    elif case == "not-a-path":
        where = 3
    elif case == "pickle-only":
        _folder(where, config, ["pytorch_model.bin"])
    elif case == "auto_map":
        _folder(where, {**config, "auto_map": {"AutoModel": "m.M"}})
    elif case == "bad-json":
        _folder(where, "{")
    elif case == "unknown-class":
        _folder(where, {**config, "architectures": ["Nope"]})
    elif case == "foreign-dsx-save":
        dsx.save(llama(), where)
        meta = json.loads((where / "dsx.json").read_text())
        (where / "dsx.json").write_text(json.dumps({**meta, "origin": "os.system"}))
    with pytest.raises(exc, match=match):
        dsx.from_pretrained(where, task=task)
