"""Bad input to dsx.optimize: refused before any plan is built or timed, with an error naming the argument, and the
caller's model left exactly as it was."""

import pytest
import torch

import dsx
from tests.bad_input.conftest import Raising, assert_refused, case, nan_x, x

pytestmark = pytest.mark.timeout(60)




def opt(m, inputs=None, **kw):
    return dsx.optimize(m, x() if inputs is None else inputs, **{"compile": False, "progress": False, **kw})


CASES = [
    # model
    case("model-str", lambda m: opt("model"), "model"),
    case("model-None", lambda m: opt(None), "model"),
    case("model-list", lambda m: opt([m]), "model"),
    case("model-raises", lambda m: opt(m), "example_inputs", make=Raising),
    # example_inputs
    case("example_inputs-None", lambda m: dsx.optimize(m, None, progress=False), "example_inputs"),
    case("example_inputs-str", lambda m: opt(m, "x"), "example_inputs"),
    case("example_inputs-float", lambda m: opt(m, 1.0), "example_inputs"),
    case("example_inputs-empty", lambda m: opt(m, []), "example_inputs"),
    case("example_inputs-nan", lambda m: opt(m, nan_x()), "example_inputs"),
    case("example_inputs-inf", lambda m: opt(m, -x() / 0), "example_inputs"),
    case("example_inputs-wrong-shape", lambda m: opt(m, torch.randn(4, 7)), "example_inputs"),
    case("example_inputs-wrong-dtype", lambda m: opt(m, x().long()), "example_inputs"),
    case("example_inputs-int-keys", lambda m: opt(m, {0: x()}), "example_inputs"),
    # max_error / metric / budget_s / compile / workload
    case("max_error-negative", lambda m: opt(m, max_error=-0.01), "max_error"),
    case("max_error-nan", lambda m: opt(m, max_error=float("nan")), "max_error"),
    case("max_error-inf", lambda m: opt(m, max_error=float("inf")), "max_error"),
    case("max_error-bool", lambda m: opt(m, max_error=True), "max_error"),
    case("max_error-str", lambda m: opt(m, max_error="0.01"), "max_error"),
    case("metric-unknown", lambda m: opt(m, max_error=0.01, metric="mse"), "metric"),
    case("metric-int", lambda m: opt(m, max_error=0.01, metric=1), "metric"),
    case("budget_s-zero", lambda m: opt(m, budget_s=0), "budget_s"),
    case("budget_s-negative", lambda m: opt(m, budget_s=-5), "budget_s"),
    case("budget_s-nan", lambda m: opt(m, budget_s=float("nan")), "budget_s"),
    case("budget_s-bool", lambda m: opt(m, budget_s=True), "budget_s"),
    case("budget_s-str", lambda m: opt(m, budget_s="10"), "budget_s"),
    case("compile-str", lambda m: opt(m, compile="yes"), "compile"),
    case("compile-int", lambda m: opt(m, compile=1), "compile"),
    case("compile-None", lambda m: opt(m, compile=None), "compile"),
    case("workload-str", lambda m: opt(m, workload="generate"), "workload"),
    # formats / passes
    case("formats-str", lambda m: opt(m, max_error=0.01, formats="int8"), "formats"),
    case("formats-empty", lambda m: opt(m, max_error=0.01, formats=[]), "formats"),
    case("formats-unknown", lambda m: opt(m, max_error=0.01, formats=["int9"]), "formats"),
    case("formats-int-item", lambda m: opt(m, max_error=0.01, formats=[8]), "formats"),
    case("formats-int", lambda m: opt(m, max_error=0.01, formats=8), "formats"),
    case("passes-unknown", lambda m: opt(m, passes="nope"), "passes"),
    case("passes-unknown-in-list", lambda m: opt(m, passes=["nope"]), "passes"),
    case("passes-int-item", lambda m: opt(m, passes=[1]), "passes"),
    # forced steps
    case("structured-without-prune", lambda m: opt(m, structured=True), "structured"),
    case("structured-str", lambda m: opt(m, prune=0.5, structured="yes"), "structured"),
    # calibration
    case("calibration-int", lambda m: opt(m, max_error=0.01, calibration=3), "calibration"),
    case("calibration-tensor", lambda m: opt(m, max_error=0.01, calibration=x()), "calibration"),
    case("calibration-empty", lambda m: opt(m, max_error=0.01, calibration=[]), "calibration"),
    case("calibration-nan-batch", lambda m: opt(m, max_error=0.01, calibration=[nan_x()]), "calibration"),
]


@pytest.mark.parametrize("make, call, exc, match", CASES)
def test_refused(make, call, exc, match):
    assert_refused(make(), call, exc, match)
