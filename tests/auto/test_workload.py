"""dsx.auto.workload: which models count as generative, and what the default and user workloads run and describe."""

import functools

import pytest
import torch
import torch.nn as nn

from dsx.auto.workload import GENERATE_TOKENS, Workload, default_workload, is_generative, user_workload
from dsx.core.inputs import normalize_inputs

transformers = pytest.importorskip("transformers")


def tiny_config():
    return transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=64, vocab_size=128)


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 128, (1, 8))


class Generates(nn.Module):
    """A stand-in with ``generate`` and a ``can_generate`` that answers ``answer`` (or raises it)."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def generate(self, **kwargs):
        return kwargs

    def can_generate(self):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_plain_modules_do_not_generate():
    assert not is_generative(nn.Linear(4, 4))
    assert not is_generative(transformers.LlamaModel(tiny_config()))


def test_can_generate_decides_and_an_exception_means_no():
    assert is_generative(Generates(True))
    assert not is_generative(Generates(False))
    assert not is_generative(Generates(RuntimeError("odd config")))
    assert not is_generative(Generates(ValueError("odd config")))


def test_generate_must_be_callable():
    m = Generates(True)
    m.generate = None
    assert not is_generative(m)
    m = nn.Linear(2, 2)
    m.can_generate = lambda: True
    assert not is_generative(m)


def test_hf_decoder_generates(decoder):
    assert is_generative(decoder)


def test_forward_workload_for_a_non_generative_model():
    torch.manual_seed(0)
    model, x = nn.Linear(8, 4).eval(), torch.randn(3, 8)
    work = default_workload(model, normalize_inputs(x))
    assert isinstance(work, Workload) and not work.exact
    assert "forward" in work.describe and work.describe == "forward on the example inputs"
    out = work.run(model)
    assert torch.equal(out, model(x)) and not out.requires_grad


def test_forward_workload_runs_the_model_it_is_given():
    a, b = nn.Linear(8, 4), nn.Linear(8, 4)
    x = torch.randn(2, 8)
    work = default_workload(a, normalize_inputs({"input": x}))
    assert torch.equal(work.run(b), b(x))


def test_forward_workload_error_names_the_inputs():
    work = default_workload(nn.Linear(8, 4), normalize_inputs(torch.randn(2, 8)))
    with pytest.raises(ValueError, match="example_inputs: the model raised"):
        work.run(nn.Linear(5, 4))


@pytest.mark.parametrize("form", ["kwargs", "args"])
def test_generate_workload_for_an_hf_decoder(decoder, ids, form):
    inputs = normalize_inputs({"input_ids": ids} if form == "kwargs" else (ids,))
    work = default_workload(decoder, inputs)
    assert work.exact and work.describe == f"generate({GENERATE_TOKENS} new tokens, greedy)"
    out = work.run(decoder)
    assert out.shape == (1, ids.shape[1] + GENERATE_TOKENS) and torch.equal(out[:, :ids.shape[1]], ids)
    ref = decoder.generate(ids, max_new_tokens=GENERATE_TOKENS, min_new_tokens=GENERATE_TOKENS, do_sample=False,
                           pad_token_id=decoder.config.eos_token_id)
    assert torch.equal(out, ref) and torch.equal(work.run(decoder), out)


@pytest.mark.parametrize("form", ["kwargs", "args"])
def test_generate_workload_passes_the_attention_mask(decoder, form):
    ids = torch.randint(0, 128, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    given = {"input_ids": ids, "attention_mask": mask} if form == "kwargs" else (ids, mask)
    work = default_workload(decoder, normalize_inputs(given))
    out = work.run(decoder)
    assert out.shape == (2, 8 + GENERATE_TOKENS)
    ref = decoder.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GENERATE_TOKENS,
                           min_new_tokens=GENERATE_TOKENS, do_sample=False, pad_token_id=decoder.config.eos_token_id)
    assert torch.equal(out, ref)


def test_float_inputs_to_a_generative_model_time_the_forward(decoder):
    embeds = torch.randn(1, 4, 32)
    work = default_workload(decoder, normalize_inputs({"inputs_embeds": embeds}))
    assert not work.exact and work.describe == "forward on the example inputs"
    assert work.run(decoder).logits.shape == (1, 4, 128)


def test_user_workload_is_named_and_called_with_the_model():
    seen = []

    def decode_batch(model):
        seen.append(model)
        return "done"

    model = nn.Linear(2, 2)
    work = user_workload(decode_batch)
    assert work.describe == "workload decode_batch(model)" and not work.exact
    assert work.run(model) == "done" and seen == [model]


def test_user_workload_of_a_callable_without_a_name_uses_its_type():
    class Runner:
        def __call__(self, model):
            return model.out_features

    assert user_workload(Runner()).describe == "workload Runner(model)"
    assert user_workload(Runner()).run(nn.Linear(2, 3)) == 3
    part = user_workload(functools.partial(lambda model, k: k, k=7))
    assert part.describe == "workload partial(model)" and part.run(nn.Linear(2, 2)) == 7
