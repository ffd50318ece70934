"""dsx.optimize: a drop-in result of the input's class, the search's choice and its report, replay, bad input.

The search's timing is replaced by fixed speed-ups where a test asserts which plan wins (tests never assert timings).
"""

import copy
import math

import pytest
import torch
import torch.nn as nn

import dsx
from dsx.auto.search import Search
from dsx.graph.compiled import is_compiled

transformers = pytest.importorskip("transformers")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 256), nn.Linear(256, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def x():
    return torch.randn(8, 64)


def plan_of(model):
    """The report name of the plan a candidate was built with, read from its history."""
    name = "original"
    for e in dsx.history(model):
        if e["transform"] == "quantize":
            fmt = e["config"]["format"]
            name = fmt["format"] + ({"bfloat16": "+bf16", "float16": "+fp16"}.get(fmt["dtype"], "")
                                    if fmt["format"] not in ("bf16", "fp16") else "")
        if e["transform"] == "compile":
            name = "compile" if name == "original" else name + "+compile"
    return name


@pytest.fixture
def speeds(monkeypatch):
    """Fix each plan's measured speed-up: set ``speeds[plan] = ratio`` (default 1.0, spread 1%)."""
    table = {}
    monkeypatch.setattr(Search, "time", lambda self, model: (1.0, table.get(plan_of(model), 1.0), 0.01))
    return table


def test_lossless_default_returns_a_copy_of_the_same_class(mlp, x, speeds):
    before = copy.deepcopy(mlp.state_dict())
    out = dsx.optimize(mlp, x, compile=False, progress=False)
    assert type(out) is MLP and out is not mlp and not out.training
    assert all(torch.equal(mlp.state_dict()[k], v) for k, v in before.items())
    rep = dsx.report(out)
    assert [r.plan for r in rep.rows] == ["original"] and rep.winner.plan == "original"
    assert "original is returned" in str(rep) and rep.max_error is None
    assert torch.equal(out(x), mlp(x))


def test_search_picks_the_fastest_plan_within_the_budget(mlp, x, speeds):
    speeds.update({"int8": 2.0, "bf16": 3.0, "int8+bf16": 5.0})
    out = dsx.optimize(mlp, x, max_error=1e-3, metric="cosine", formats=["int8", "bf16", "int8+bf16"],
                       compile=False, progress=False)
    rep = dsx.report(out)
    rows = {r.plan: r for r in rep.rows}
    assert set(rows) == {"original", "int8", "bf16", "int8+bf16"}
    assert rep.winner.plan == "int8+bf16" and rows["int8+bf16"].speedup == 5.0
    assert all(r.error is not None and r.error <= 1e-3 for r in rows.values() if r.status == "ok")
    assert type(out) is MLP and out.up.weight.dtype == torch.int8
    assert out(x).dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(out(x), mlp(x)).min()
    assert 1 - cos <= 1e-3
    assert "dsx.optimize on cpu: cosine <= 0.001" in str(rep) and "<table>" in rep._repr_html_()


def test_never_slower_returns_the_original_when_nothing_beats_the_noise(mlp, x, speeds):
    speeds.update({"int8": 1.02})
    out = dsx.optimize(mlp, x, max_error=0.1, formats=["int8"], compile=False, progress=False)
    rep = dsx.report(out)
    assert rep.winner.plan == "original" and not dsx.history(out)
    assert "not faster beyond the noise" in rep.notes[0]


def test_a_tight_budget_keeps_the_most_sensitive_layers_float(mlp, x, speeds):
    speeds.update({"int8": 2.0})
    full = dsx.quantize(mlp, "int8", progress=False)
    err = dsx.core.transform.compare_outputs(mlp(x), full(x))["max_rel"]
    out = dsx.optimize(mlp, x, max_error=err / 3, formats=["int8"], compile=False, progress=False)
    row = next(r for r in dsx.report(out).rows if r.plan == "int8")
    assert row.kept_float >= 1 and row.error <= err / 3
    assert dsx.report(out).winner.plan == "int8"


def test_callable_metric_judges_the_plans(mlp, x, speeds):
    speeds.update({"int8": 2.0, "bf16": 4.0})
    seen = []

    def metric(model):
        seen.append(plan_of(model))
        return 0.5 if plan_of(model) == "bf16" else 0.0

    out = dsx.optimize(mlp, x, max_error=0.1, metric=metric, formats=["int8", "bf16"], compile=False,
                       progress=False)
    rows = {r.plan: r for r in dsx.report(out).rows}
    assert rows["bf16"].status == "over budget" and dsx.report(out).winner.plan == "int8"
    assert "int8" in seen and dsx.report(out).metric == "callable metric"


def test_chosen_plan_replays_bit_exactly_and_keeps_its_report(mlp, x, speeds, tmp_path):
    speeds.update({"int8+bf16": 3.0})
    out = dsx.optimize(mlp, x, max_error=0.05, formats=["int8+bf16"], compile=False, progress=False)
    dsx.save(out, tmp_path / "m")
    again = dsx.load(MLP(), tmp_path / "m")
    a, b = out.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(again(x), out(x))
    assert dsx.report(again).winner.plan == "int8+bf16"
    assert "int8+bf16" in str(dsx.summary(out))


def test_inplace_turns_the_callers_model_into_the_result(mlp, x, speeds):
    speeds.update({"int8": 2.0})
    out = dsx.optimize(mlp, x, max_error=0.1, formats=["int8"], compile=False, inplace=True, progress=False)
    assert out is mlp and mlp.up.weight.dtype == torch.int8


def test_budget_s_stops_trying_plans(mlp, x, speeds):
    out = dsx.optimize(mlp, x, max_error=0.1, formats=["int8", "bf16"], compile=False, budget_s=1e-9,
                       progress=False)
    statuses = [r.status for r in dsx.report(out).rows[1:]]
    assert statuses == ["not tried: budget_s spent"] * 2


def test_forced_steps_are_applied(mlp, x, speeds):
    out = dsx.optimize(mlp, x, quantize="int8", compile=False, progress=False)
    assert out.up.weight.dtype == torch.int8 and dsx.history(out)[0]["transform"] == "quantize"
    assert "forced steps: quantize" in dsx.report(out).notes[0]


def test_plan_that_fails_to_build_is_reported_not_raised(mlp, x, speeds):
    out = dsx.optimize(mlp, x, max_error=0.1, formats=["fp8"], compile=False, progress=False)
    row = dsx.report(out).rows[1]
    assert row.plan == "fp8" and (row.status.startswith("failed:") or row.status == "ok")


def test_hf_decoder_stays_a_drop_in_for_generate_after_compiling(speeds, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=100)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (1, 8))
    speeds.update({"compile": 1.5})
    out = dsx.optimize(model, {"input_ids": ids}, progress=False)
    assert type(out) is transformers.LlamaForCausalLM and is_compiled(out) and out.config is not model.config
    rep = dsx.report(out)
    assert rep.winner.plan == "compile" and rep.workload.startswith("generate(")
    for prompt in (ids, torch.randint(0, 100, (2, 5))):
        ref = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), ref)
    out.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize("kwargs,error,match", [
    ({"max_error": -0.1}, ValueError, "max_error: expected None"),
    ({"max_error": math.nan}, ValueError, "max_error: expected None"),
    ({"max_error": "0.1"}, ValueError, "max_error: expected None"),
    ({"max_error": True}, ValueError, "max_error: expected None"),
    ({"metric": "l2"}, ValueError, "metric: expected one of"),
    ({"metric": 3}, TypeError, "metric: expected one of"),
    ({"formats": ["int9"]}, ValueError, "formats: unknown format 'int9'"),
    ({"formats": "int8"}, TypeError, "formats: expected a list"),
    ({"formats": []}, ValueError, "formats: the list is empty"),
    ({"formats": [8]}, TypeError, "formats: expected format names"),
    ({"budget_s": 0}, ValueError, "budget_s: expected None or a positive"),
    ({"budget_s": -1.0}, ValueError, "budget_s: expected None or a positive"),
    ({"compile": "yes"}, TypeError, "compile: expected True or False"),
    ({"workload": 3}, TypeError, "workload: expected a callable"),
    ({"passes": ["nope"]}, ValueError, "passes: unknown pass 'nope'"),
    ({"structured": True}, ValueError, "structured: needs prune="),
])
def test_bad_arguments_name_the_argument(mlp, x, kwargs, error, match):
    with pytest.raises(error, match=match):
        dsx.optimize(mlp, x, progress=False, **kwargs)


def test_lossy_only_arguments_without_max_error_warn(mlp, x):
    with pytest.warns(UserWarning, match="metric / formats: ignored without max_error"):
        dsx.optimize(mlp, x, metric="cosine", formats=["int8"], compile=False, progress=False)


def test_bad_model_and_inputs(mlp, x):
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        dsx.optimize(lambda t: t, x)
    with pytest.raises(TypeError, match="example_inputs"):
        dsx.optimize(mlp, "an image")
    with pytest.raises(ValueError, match="example_inputs: the model raised"):
        dsx.optimize(mlp, torch.randn(2, 5))
    with pytest.raises(ValueError, match="model: has no dsx.optimize report"):
        dsx.report(mlp)


def test_calibrated_format_is_tried_with_the_calibration_batches(mlp, x, speeds):
    speeds.update({"int8_static": 2.0})
    calib = [torch.randn(8, 64) for _ in range(3)]
    out = dsx.optimize(mlp, x, max_error=0.05, metric="cosine", calibration=calib, formats=["int8_static"],
                       compile=False, progress=False)
    assert dsx.report(out).winner.plan == "int8_static" and out.up.input_scale.item() > 0
