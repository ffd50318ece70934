"""dsx.auto.search.Search: each plan's report row (ok / failed / over budget / not tried / tokens differ), the
winner re-measured against MIN_GAIN and the spread, warm-up calls before timing. Timing is patched, never asserted.
"""

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import dsx
import dsx.auto.search as search_mod
from dsx.auto.plans import Plan
from dsx.auto.search import BUILD_ERRORS, MIN_GAIN, WARMUP_CALLS, Search
from dsx.auto.workload import Workload, default_workload
from dsx.core.inputs import normalize_inputs, run_model
from dsx.core.transform import Transform, VerificationError, compare_outputs
from dsx.quant.config import resolve_config


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@dataclass
class Identity(Transform):
    """A lossless step (unnamed, so not registered): the candidate is a copy of the original."""

    def apply(self, model, inputs):
        return model, {}


class StepPlan(Plan):
    """A plan with fixed steps, or one whose building raises ``error``."""

    def __init__(self, name, steps=(), error=None):
        super().__init__(name)
        self.steps, self.error = list(steps), error

    def transforms(self, *, quantize=None, passes=None):
        if self.error is not None:
            raise self.error
        return self.steps


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def x():
    return torch.randn(8, 64)


@pytest.fixture(autouse=True)
def no_timing(monkeypatch):
    """The original's side-by-side timing in ``run`` returns at once (``paired_ms`` is not under test here)."""
    monkeypatch.setattr(search_mod, "paired_ms", lambda a, b, rounds=5: (1.0, 1.0, 1.0, 0.0))


@pytest.fixture
def speeds(monkeypatch):
    """Fix the measured speed-up of a candidate: ``speeds[plan] = [ratio, ...]`` (one per ``time`` call, the last
    repeated), spread 1%; a plan is recognised by the ``_plan`` tag the tests set on the candidate it builds."""
    table = {}

    def fake_time(self, model):
        ratios = table.get(getattr(model, "_plan", None), [1.0])
        ratio = ratios.pop(0) if len(ratios) > 1 else ratios[0]
        return 2.0, ratio, 0.01

    monkeypatch.setattr(Search, "time", fake_time)
    return table


@dataclass
class Tag(Identity):
    """Identity that tags the candidate with its plan name, for ``speeds``."""

    plan: str = ""

    def apply(self, model, inputs):
        model._plan = self.plan
        return model, {}


def tagged(name):
    return StepPlan(name, [Tag(plan=name)])


def make_search(model, x, *, lossy=True, metric="max_rel", budget=0.1, workload=None, budget_s=None):
    inputs = normalize_inputs(x)
    base = copy.deepcopy(model).eval()
    work = workload if workload is not None else default_workload(base, inputs)
    return Search(base, inputs, [inputs], metric=metric, budget=budget, lossy=lossy, workload=work, passes=None,
                  budget_s=budget_s, progress=False)


def rows(report):
    return {r.plan: r for r in report.rows}


def test_constants():
    assert 0 < MIN_GAIN < 0.5 and isinstance(WARMUP_CALLS, int) and WARMUP_CALLS >= 1
    assert VerificationError in BUILD_ERRORS and ValueError in BUILD_ERRORS
    assert KeyError not in BUILD_ERRORS and Exception not in BUILD_ERRORS


def test_the_fastest_plan_wins_and_its_row_is_marked(mlp, x, speeds):
    speeds.update({"a": [1.5], "b": [3.0], "c": [2.0]})
    model, report = make_search(mlp, x).run([tagged("a"), tagged("b"), tagged("c")])
    assert model._plan == "b" and type(model) is MLP
    got = rows(report)
    assert [r.plan for r in report.rows] == ["original", "a", "b", "c"]
    assert report.winner.plan == "b" and got["b"].won and not got["original"].won
    assert [r.plan for r in report.rows if r.won] == ["b"]
    assert got["b"].status == "ok" and got["b"].speedup == 3.0 and got["b"].latency_ms == 2.0
    assert got["b"].spread == 0.01 and got["b"].error == 0.0 and got["b"].size_mb > 0
    assert got["original"].speedup == 1.0 and got["original"].error == 0.0
    assert report.device == "cpu" and report.metric == "max_rel" and report.max_error == 0.1
    assert report.workload == "forward on the example inputs"
    assert report.notes[-1].startswith("search took ") and report.notes[-1].endswith(" s")


def test_a_real_int8_plan_is_built_and_returned(mlp, x, monkeypatch):
    monkeypatch.setattr(Search, "time", lambda self, model: (1.0, 2.0, 0.01))
    plan = Plan("int8", resolve_config("int8"))
    model, report = make_search(mlp, x, budget=0.1).run([plan])
    assert report.winner.plan == "int8" and model.up.weight.dtype == torch.int8
    assert dsx.history(model)[0]["transform"] == "quantize"
    row = rows(report)["int8"]
    assert 0 < row.error <= 0.1 and row.kept_float == 0
    assert row.size_mb < rows(report)["original"].size_mb


@pytest.mark.parametrize("ratio,spread", [(1.0 + MIN_GAIN, 0.01), (1.0 + MIN_GAIN / 2, 0.0), (1.4, 0.5), (0.8, 0.0)])
def test_the_original_is_returned_within_min_gain_or_the_spread(mlp, x, monkeypatch, ratio, spread):
    monkeypatch.setattr(Search, "time", lambda self, model: (1.0, ratio, spread))
    search = make_search(mlp, x)
    model, report = search.run([tagged("a")])
    assert model is search.base and report.winner.plan == "original"
    assert not hasattr(model, "_plan") and [r.plan for r in report.rows if r.won] == ["original"]
    if ratio > 1.0:
        assert "the fastest plan, a, measured" in report.notes[0]
        assert "not faster beyond the noise, so the original is returned" in report.notes[0]
        assert rows(report)["a"].speedup == ratio and rows(report)["a"].spread == spread
    else:
        assert report.notes[0] == "no plan was faster than the original: the original is returned (a copy)"


def test_a_speedup_just_beyond_min_gain_wins(mlp, x, monkeypatch):
    monkeypatch.setattr(Search, "time", lambda self, model: (1.0, 1.0 + MIN_GAIN + 0.01, 0.0))
    model, report = make_search(mlp, x).run([tagged("a")])
    assert model._plan == "a" and report.winner.plan == "a"


def test_the_winner_is_re_measured_and_the_second_measurement_counts(mlp, x, speeds):
    speeds.update({"a": [3.0, 1.01]})
    search = make_search(mlp, x)
    model, report = search.run([tagged("a")])
    assert model is search.base and report.winner.plan == "original"
    assert rows(report)["a"].speedup == 1.01 and "measured 1.01x" in report.notes[0]


def test_a_plan_that_fails_to_build_gets_a_row_and_the_search_goes_on(mlp, x, speeds):
    speeds.update({"good": [2.0]})
    plans = [StepPlan("broken", error=NotImplementedError("no kernel for this\nsecond line")),
             StepPlan("verify", error=VerificationError("outputs drift")), tagged("good")]
    model, report = make_search(mlp, x).run(plans)
    got = rows(report)
    assert got["broken"].status == "failed: NotImplementedError: no kernel for this"
    assert got["verify"].status == "failed: VerificationError: outputs drift"
    assert got["broken"].error is None and got["broken"].speedup is None and not got["broken"].won
    assert report.winner.plan == "good" and model._plan == "good"


def test_an_empty_error_message_still_gives_a_failed_row(mlp, x, speeds):
    _, report = make_search(mlp, x).run([StepPlan("empty", error=ValueError())])
    assert rows(report)["empty"].status == "failed: ValueError: "


def test_an_error_outside_build_errors_is_raised(mlp, x, speeds):
    with pytest.raises(KeyError, match="not a build error"):
        make_search(mlp, x).run([StepPlan("bad", error=KeyError("not a build error"))])


def test_a_plan_over_the_error_budget_is_reported_not_timed(mlp, x, speeds, monkeypatch):
    timed = []
    monkeypatch.setattr(Search, "time", lambda self, model: timed.append(model) or (1.0, 5.0, 0.0))
    search = make_search(mlp, x, budget=1e-6)
    model, report = search.run([Plan("bf16", resolve_config("bf16"))])
    row = rows(report)["bf16"]
    assert row.status == "over budget" and row.error > 1e-6 and row.size_mb > 0 and row.speedup is None
    assert timed == [] and model is search.base and report.winner.plan == "original"


def test_a_tight_budget_keeps_layers_float_and_reports_how_many(mlp, x, speeds):
    full = dsx.quantize(mlp, "int8", progress=False)
    err = compare_outputs(mlp(x), full(x))["max_rel"]
    _, report = make_search(mlp, x, budget=err / 3).run([Plan("int8", resolve_config("int8"))])
    row = rows(report)["int8"]
    assert row.status == "ok" and row.kept_float >= 1 and row.error <= err / 3


def test_budget_s_already_spent_leaves_plans_untried(mlp, x, speeds):
    search = make_search(mlp, x, budget_s=1e-9)
    model, report = search.run([tagged("a"), Plan("int8", resolve_config("int8"))])
    assert [(r.plan, r.status) for r in report.rows[1:]] == [("a", "not tried: budget_s spent"),
                                                              ("int8", "not tried: budget_s spent")]
    assert all(r.error is None and r.latency_ms is None for r in report.rows[1:])
    assert model is search.base and report.winner.plan == "original"


def test_a_callable_metric_returning_nan_fails_the_plan(mlp, x, speeds):
    speeds.update({"a": [2.0], "b": [2.0]})
    seen = []

    def metric(model):
        seen.append(getattr(model, "_plan", "original"))
        return math.nan if getattr(model, "_plan", None) == "a" else 0.01

    model, report = make_search(mlp, x, metric=metric, budget=0.1).run([tagged("a"), tagged("b")])
    got = rows(report)
    assert got["a"].status == "failed: ValueError: metric: the callable returned nan; it must return a finite error"
    assert got["b"].status == "ok" and got["b"].error == 0.01 and model._plan == "b"
    assert seen == ["a", "b"] and report.metric == "callable metric"


def test_a_string_metric_is_the_worst_over_every_batch(mlp, x, speeds):
    inputs, far = normalize_inputs(x), normalize_inputs(torch.randn(8, 64) * 100)
    base = copy.deepcopy(mlp).eval()
    search = Search(base, inputs, [inputs, far], metric="cosine", budget=0.1, lossy=True,
                    workload=default_workload(base, inputs), passes=None, budget_s=None, progress=False)
    assert len(search.refs) == 2 and torch.equal(search.refs[1], run_model(base, far))
    assert search.error(copy.deepcopy(base)) < 1e-6
    q = dsx.quantize(base, "int8", progress=False)
    each = [compare_outputs(run_model(base, b), run_model(q, b))["cosine_error"] for b in (inputs, far)]
    assert each[0] != each[1] and search.error(q) == max(each)
    _, report = search.run([Plan("int8", resolve_config("int8"))])
    assert rows(report)["int8"].error == pytest.approx(max(each)) and report.metric == "cosine"


def test_lossless_search_reports_max_rel_and_no_budget(mlp, x, speeds):
    speeds.update({"a": [2.0]})
    model, report = make_search(mlp, x, lossy=False, metric="cosine", budget=1e-4).run([tagged("a")])
    assert report.metric == "max_rel" and report.max_error is None and report.winner.plan == "a"


def test_workload_calls_warm_up_before_timing(mlp, x, monkeypatch):
    calls = []
    work = Workload(lambda m: calls.append(getattr(m, "_plan", "original")) or m(x), "counted")
    at_time = []
    monkeypatch.setattr(Search, "time", lambda self, model: at_time.append(list(calls)) or (1.0, 2.0, 0.0))
    search = make_search(mlp, x, workload=work)
    assert calls == ["original"]  # the reference workload output
    model, report = search.run([tagged("a")])
    assert at_time[0] == ["original"] + ["a"] * WARMUP_CALLS
    assert len(at_time) == 2 and report.workload == "counted" and report.winner.plan == "a"


def test_lossless_exact_workload_must_give_the_same_tokens(mlp, x, speeds):
    speeds.update({"differs": [5.0], "same": [2.0]})
    work = Workload(lambda m: torch.tensor([1]) if getattr(m, "_plan", None) == "differs" else torch.tensor([0]),
                    "tokens", exact=True)
    model, report = make_search(mlp, x, lossy=False, budget=1e-4, workload=work).run(
        [tagged("differs"), tagged("same")])
    got = rows(report)
    assert got["differs"].status == "generate() tokens differ" and got["differs"].error == 0.0
    assert got["same"].status == "ok" and model._plan == "same"


def test_a_lossy_search_does_not_compare_tokens(mlp, x, speeds):
    speeds.update({"differs": [5.0]})
    work = Workload(lambda m: torch.tensor([1]) if getattr(m, "_plan", None) == "differs" else torch.tensor([0]),
                    "tokens", exact=True)
    model, report = make_search(mlp, x, workload=work).run([tagged("differs")])
    assert rows(report)["differs"].status == "ok" and model._plan == "differs"


def test_time_runs_the_original_against_the_candidate(mlp, x, monkeypatch):
    ran = []
    work = Workload(lambda m: ran.append(getattr(m, "_plan", "original")), "recorded")

    def fake_paired(a, b, rounds=5):
        a()
        b()
        return 4.0, 2.0, 2.0, 0.05

    search = make_search(mlp, x, workload=work)
    monkeypatch.setattr(search_mod, "paired_ms", fake_paired)
    candidate = copy.deepcopy(search.base)
    candidate._plan = "candidate"
    ran.clear()
    assert search.time(candidate) == (2.0, 2.0, 0.05)
    assert ran == ["original", "candidate"]


def test_a_plan_failing_in_its_workload_is_a_failed_row_and_the_search_goes_on(mlp, x, speeds):
    speeds["good"] = [2.0]

    def workload(m):
        if getattr(m, "_plan", None) == "breaks":
            raise RuntimeError("generate() failed at the second shape\nmore")
        return run_model(m, normalize_inputs(x))

    search = make_search(mlp, x, workload=Workload(workload, "test workload"))
    model, report = search.run([tagged("breaks"), tagged("good")])
    assert rows(report)["breaks"].status == "failed: RuntimeError: generate() failed at the second shape"
    assert report.winner.plan == "good"


def test_a_lossless_search_ignores_a_callable_metric(mlp, x, speeds):
    search = make_search(mlp, x, lossy=False, metric=lambda m: 1.0, budget=1e-4)
    speeds["same"] = [2.0]
    _, report = search.run([tagged("same")])
    assert rows(report)["same"].status == "ok" and rows(report)["same"].error == 0.0
