"""Bad input to dsx.Fuse, dsx.Compile, dsx.capture and the torch.compile backend (dsx.compile_backend /
backend="dsx"): a clear error naming the argument, and the caller's model left exactly as it was (nothing here
compiles: every case is refused first)."""

import pytest
import torch

import dsx
from dsx.graph.backend import DsxBackend
from tests.bad_input.conftest import Raising, assert_refused, case, mlp, nan_mlp, nan_x, x

pytestmark = pytest.mark.timeout(60)




def compiled():
    return dsx.Compile()(mlp())


def training():
    return mlp().train()


CASES = [
    # Fuse: configuration
    case("Fuse-passes-unknown", lambda m: dsx.Fuse(passes="nope")(m, x()), "passes"),
    case("Fuse-passes-unknown-in-list", lambda m: dsx.Fuse(passes=["nope"])(m, x()), "passes"),
    case("Fuse-passes-int", lambda m: dsx.Fuse(passes=5)(m, x()), "passes"),
    case("Fuse-passes-int-item", lambda m: dsx.Fuse(passes=[5])(m, x()), "passes"),
    case("Fuse-passes-set", lambda m: dsx.Fuse(passes={"bias_act"})(m, x()), "passes"),
    case("Fuse-passes-dict", lambda m: dsx.Fuse(passes={})(m, x()), "passes"),
    case("Fuse-dynamic_batch-str", lambda m: dsx.Fuse(dynamic_batch="yes")(m, x()), "dynamic_batch"),
    case("Fuse-dynamic_batch-None", lambda m: dsx.Fuse(dynamic_batch=None)(m, x()), "dynamic_batch"),
    case("Fuse-dynamic_batch-int", lambda m: dsx.Fuse(dynamic_batch=1)(m, x()), "dynamic_batch"),
    case("Fuse-inplace-str", lambda m: dsx.Fuse(inplace="yes")(m, x()), "inplace"),
    case("Fuse-verify-None", lambda m: dsx.Fuse(verify=None)(m, x()), "verify"),
    # Fuse: model / inputs
    case("Fuse-model-str", lambda m: dsx.Fuse()("model", x()), "model"),
    case("Fuse-model-nan-weights", lambda m: dsx.Fuse()(m, x()), "model", make=nan_mlp),
    case("Fuse-model-training", lambda m: dsx.Fuse()(m, x()), "model", make=training),
    case("Fuse-model-raises", lambda m: dsx.Fuse()(m, x()), "example_inputs", make=lambda: Raising().eval()),
    case("Fuse-no-example_inputs", lambda m: dsx.Fuse()(m), "example_inputs"),
    case("Fuse-example_inputs-str", lambda m: dsx.Fuse()(m, "x"), "example_inputs"),
    case("Fuse-example_inputs-nan", lambda m: dsx.Fuse()(m, nan_x()), "example_inputs"),
    case("Fuse-example_inputs-wrong-shape", lambda m: dsx.Fuse()(m, torch.randn(4, 7)), "example_inputs"),
    case("Fuse-example_inputs-empty", lambda m: dsx.Fuse()(m, ()), "example_inputs"),
    case("Fuse-dynamic_batch-batch-of-one", lambda m: dsx.Fuse(dynamic_batch=True)(m, x()[:1]), "dynamic_batch"),
    # Compile
    case("Compile-passes-unknown", lambda m: dsx.Compile(passes="nope")(m), "passes"),
    case("Compile-passes-int", lambda m: dsx.Compile(passes=3)(m), "passes"),
    case("Compile-passes-int-item", lambda m: dsx.Compile(passes=[None])(m), "passes"),
    case("Compile-dynamic-str", lambda m: dsx.Compile(dynamic="auto")(m), "dynamic"),
    case("Compile-dynamic-int", lambda m: dsx.Compile(dynamic=1)(m), "dynamic"),
    case("Compile-model-str", lambda m: dsx.Compile()("model"), "model"),
    case("Compile-model-nan-weights", lambda m: dsx.Compile()(m), "model", make=nan_mlp),
    case("Compile-already-compiled", lambda m: dsx.Compile(inplace=True)(m), "compiled", make=compiled),
    case("Compile-example_inputs-str", lambda m: dsx.Compile()(m, "x"), "example_inputs"),
    case("Compile-example_inputs-nan", lambda m: dsx.Compile()(m, nan_x()), "example_inputs"),
    case("Compile-example_inputs-wrong-shape", lambda m: dsx.Compile()(m, torch.randn(4, 7)), "example_inputs"),
    case("Compile-inplace-int", lambda m: dsx.Compile(inplace=0)(m), "inplace"),
    # capture
    case("capture-model-str", lambda m: dsx.capture("model", x()), "model"),
    case("capture-model-list", lambda m: dsx.capture([m], x()), "model"),
    case("capture-model-raises", lambda m: dsx.capture(m, x()), "example_inputs", make=Raising),
    case("capture-example_inputs-None", lambda m: dsx.capture(m, None), "example_inputs"),
    case("capture-example_inputs-str", lambda m: dsx.capture(m, "x"), "example_inputs"),
    case("capture-example_inputs-nan", lambda m: dsx.capture(m, nan_x()), "example_inputs"),
    case("capture-example_inputs-wrong-shape", lambda m: dsx.capture(m, torch.randn(4, 7)), "example_inputs"),
    case("capture-dynamic_batch-batch-of-one", lambda m: dsx.capture(m, x()[:1], dynamic_batch=True),
         "dynamic_batch"),
    case("capture-training-batch-of-one", lambda m: dsx.capture(m, x()[:1], dynamic_batch=True), "dynamic_batch",
         make=training),
    # the torch.compile backend, constructed (never run)
    case("compile_backend-passes-unknown", lambda m: dsx.compile_backend(passes="nope"), "passes"),
    case("compile_backend-passes-unknown-in-list", lambda m: dsx.compile_backend(passes=["bias_act", "nope"]),
         "passes"),
    case("compile_backend-passes-int", lambda m: dsx.compile_backend(passes=1), "passes"),
    case("compile_backend-passes-int-item", lambda m: dsx.compile_backend(passes=[1]), "passes"),
    case("torch.compile-backend-passes-unknown",
         lambda m: torch.compile(m, backend=dsx.compile_backend(passes="nope")), "passes"),
    case("DsxBackend-passes-unknown", lambda m: DsxBackend(passes="nope"), "passes"),
]


@pytest.mark.parametrize("make, call, exc, match", CASES)
def test_refused(make, call, exc, match):
    assert_refused(make(), call, exc, match)
