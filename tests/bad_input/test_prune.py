"""Bad input to dsx.prune / dsx.Prune, dsx.sparsify / dsx.Sparsify, dsx.make_permanent and dsx.PruningSchedule:
a clear error naming the argument (or a warning for a documented no-op), and the caller's model left as it was."""

import pytest
import torch

import dsx
from tests.bad_input.conftest import (assert_refused, assert_untouched, case, convnet, img, mlp, nan_mlp, nan_x,
                                      snapshot, x)

pytestmark = pytest.mark.timeout(60)




def quantized():
    return dsx.quantize(mlp(), "int8", progress=False)


def schedule(**kw):
    return dsx.PruningSchedule(**{"start": 0, "end": 10, "steps": 5, "amount": 0.5, **kw})


CASES = [
    # prune: model
    case("prune-model-str", lambda m: dsx.prune("model", 0.5), "model"),
    case("prune-model-list", lambda m: dsx.prune([m], 0.5), "model"),
    case("prune-model-nan-weights", lambda m: dsx.prune(m, 0.5), "model", make=nan_mlp),
    # prune: amount
    case("prune-amount-negative", lambda m: dsx.prune(m, -0.1), "amount"),
    case("prune-amount-one", lambda m: dsx.prune(m, 1.0), "amount"),
    case("prune-amount-1.5", lambda m: dsx.prune(m, 1.5), "amount"),
    case("prune-amount-nan", lambda m: dsx.prune(m, float("nan")), "amount"),
    case("prune-amount-inf", lambda m: dsx.prune(m, float("inf")), "amount"),
    case("prune-amount-bool", lambda m: dsx.prune(m, True), "amount"),
    case("prune-amount-str", lambda m: dsx.prune(m, "0.5"), "amount"),
    case("prune-amount-None", lambda m: dsx.prune(m, None), "amount"),
    case("prune-amount-tensor", lambda m: dsx.prune(m, torch.tensor(0.5)), "amount"),
    case("prune-structured-amount-1.5", lambda m: dsx.prune(m, 1.5, structured=True, example_inputs=img()), "amount",
         make=convnet),
    # prune: structured / importance / scope / round_to / skip / calibration / max_error / plan
    case("prune-structured-str", lambda m: dsx.prune(m, 0.5, structured="yes"), "structured"),
    case("prune-structured-int", lambda m: dsx.prune(m, 0.5, structured=1), "structured"),
    case("prune-structured-no-inputs", lambda m: dsx.prune(m, 0.5, structured=True), "example_inputs", make=convnet),
    case("prune-importance-unknown", lambda m: dsx.prune(m, 0.5, importance="l3"), "importance"),
    case("prune-importance-taylor-unstructured", lambda m: dsx.prune(m, 0.5, importance="taylor"), "importance"),
    case("prune-importance-None", lambda m: dsx.prune(m, 0.5, importance=None), "importance"),
    case("prune-scope-unknown", lambda m: dsx.prune(m, 0.5, scope="globl"), "scope"),
    case("prune-scope-None", lambda m: dsx.prune(m, 0.5, scope=None), "scope"),
    case("prune-structured-scope-unknown",
         lambda m: dsx.prune(m, 0.5, structured=True, scope="layer", example_inputs=img()), "scope", make=convnet),
    case("prune-round_to-unstructured", lambda m: dsx.prune(m, 0.5, round_to=8), "round_to"),
    case("prune-round_to-zero", lambda m: dsx.prune(m, 0.5, structured=True, round_to=0, example_inputs=img()),
         "round_to", make=convnet),
    case("prune-round_to-negative", lambda m: dsx.prune(m, 0.5, structured=True, round_to=-8, example_inputs=img()),
         "round_to", make=convnet),
    case("prune-round_to-float", lambda m: dsx.prune(m, 0.5, structured=True, round_to=2.5, example_inputs=img()),
         "round_to", make=convnet),
    case("prune-round_to-bool", lambda m: dsx.prune(m, 0.5, structured=True, round_to=True, example_inputs=img()),
         "round_to", make=convnet),
    case("prune-skip-str", lambda m: dsx.prune(m, 0.5, skip="0"), "skip"),
    case("prune-calibration-unstructured", lambda m: dsx.prune(m, 0.5, calibration=[x()]), "calibration"),
    case("prune-plan-unstructured", lambda m: dsx.prune(m, 0.5, plan={}), "plan"),
    case("prune-structured-plan-list", lambda m: dsx.prune(m, 0.5, structured=True, plan=[1], example_inputs=img()),
         "plan", make=convnet),
    case("prune-max_error-negative", lambda m: dsx.prune(m, 0.5, max_error=-1), "max_error"),
    case("prune-max_error-zero", lambda m: dsx.prune(m, 0.5, max_error=0), "max_error"),
    case("prune-max_error-str", lambda m: dsx.prune(m, 0.5, max_error="0.1"), "max_error"),
    case("prune-max_error-bool", lambda m: dsx.prune(m, 0.5, max_error=True), "max_error"),
    case("prune-unknown-kwarg", lambda m: dsx.prune(m, 0.5, sparsity=0.5), "sparsity"),
    # prune: example_inputs
    case("prune-example_inputs-str", lambda m: dsx.prune(m, 0.5, example_inputs="x"), "example_inputs"),
    case("prune-example_inputs-nan", lambda m: dsx.prune(m, 0.5, example_inputs=nan_x()), "example_inputs"),
    case("prune-example_inputs-wrong-shape", lambda m: dsx.prune(m, 0.5, example_inputs=torch.randn(4, 7)),
         "example_inputs"),
    case("prune-structured-example_inputs-wrong-shape",
         lambda m: dsx.prune(m, 0.5, structured=True, example_inputs=torch.randn(2, 5, 8, 8)), "example_inputs",
         make=convnet),
    case("prune-structured-example_inputs-nan",
         lambda m: dsx.prune(m, 0.5, structured=True, example_inputs=img() / 0), "example_inputs", make=convnet),
    # prune: flags
    case("prune-inplace-str", lambda m: dsx.prune(m, 0.5, inplace="yes"), "inplace"),
    case("prune-verify-None", lambda m: dsx.prune(m, 0.5, verify=None), "verify"),
    # sparsify
    case("sparsify-model-str", lambda m: dsx.sparsify("model"), "model"),
    case("sparsify-model-nan-weights", lambda m: dsx.sparsify(m), "model", make=nan_mlp),
    case("sparsify-model-quantized", lambda m: dsx.sparsify(m), "model", make=quantized),
    case("sparsify-pattern-1:4", lambda m: dsx.sparsify(m, "1:4"), "pattern"),
    case("sparsify-pattern-4:8", lambda m: dsx.sparsify(m, "4:8"), "pattern"),
    case("sparsify-pattern-None", lambda m: dsx.sparsify(m, None), "pattern"),
    case("sparsify-pattern-float", lambda m: dsx.sparsify(m, 0.5), "pattern"),
    case("sparsify-skip-str", lambda m: dsx.sparsify(m, skip="0"), "skip"),
    case("sparsify-accelerate-str", lambda m: dsx.sparsify(m, accelerate="yes"), "accelerate"),
    case("sparsify-accelerate-on-cpu", lambda m: dsx.sparsify(m, accelerate=True), "accelerate"),
    case("sparsify-max_error-negative", lambda m: dsx.sparsify(m, max_error=-0.5), "max_error"),
    case("sparsify-max_error-zero", lambda m: dsx.sparsify(m, max_error=0.0), "max_error"),
    case("sparsify-example_inputs-str", lambda m: dsx.sparsify(m, example_inputs="x"), "example_inputs"),
    case("sparsify-example_inputs-nan", lambda m: dsx.sparsify(m, example_inputs=nan_x()), "example_inputs"),
    case("sparsify-example_inputs-wrong-shape", lambda m: dsx.sparsify(m, example_inputs=torch.randn(4, 7)),
         "example_inputs"),
    case("sparsify-inplace-int", lambda m: dsx.sparsify(m, inplace=1), "inplace"),
    case("Sparsify-layers-unknown", lambda m: dsx.Sparsify(layers=["nope"])(m), "layers"),
    case("Sparsify-layers-wrong-shape", lambda m: dsx.Sparsify(layers=["7"])(m), "layers", make=convnet),
    # make_permanent
    case("make_permanent-model-str", lambda m: dsx.make_permanent("model"), "model"),
    case("make_permanent-inplace-str", lambda m: dsx.make_permanent(m, inplace="no"), "inplace"),
    # PruningSchedule
    case("schedule-start-str", lambda m: schedule(start="0"), "start"),
    case("schedule-start-after-end", lambda m: schedule(start=10, end=5), "start"),
    case("schedule-end-float", lambda m: schedule(end=10.0), "end"),
    case("schedule-steps-zero", lambda m: schedule(steps=0), "steps"),
    case("schedule-steps-too-many", lambda m: schedule(steps=11), "steps"),
    case("schedule-steps-bool", lambda m: schedule(steps=True), "steps"),
    case("schedule-amount-1.5", lambda m: schedule(amount=1.5), "amount"),
    case("schedule-amount-nan", lambda m: schedule(amount=float("nan")), "amount"),
    case("schedule-initial-above-amount", lambda m: schedule(initial=0.8), "initial"),
    case("schedule-scope-unknown", lambda m: schedule(scope="layer"), "scope"),
    case("schedule-skip-str", lambda m: schedule(skip="0"), "skip"),
    case("schedule-step-float", lambda m: schedule().step(m, 5.0), "step"),
    case("schedule-step-str", lambda m: schedule().step(m, "5"), "step"),
    case("schedule-step-model-nan-weights", lambda m: schedule().step(m, 5), "model", make=nan_mlp),
    case("prune-structured-importance-unknown",
         lambda m: dsx.prune(m, 0.5, structured=True, importance="l3", example_inputs=img()), "importance",
         make=convnet),
    case("prune-structured-model-raises",
         lambda m: dsx.prune(m, 0.5, structured=True, example_inputs=torch.randn(4, 7)), "example_inputs"),
    case("sparsify-accelerate-int", lambda m: dsx.sparsify(m, accelerate=1), "accelerate"),
]


@pytest.mark.parametrize("make, call, exc, match", CASES)
def test_refused(make, call, exc, match):
    assert_refused(make(), call, exc, match)


WARNS = [
    pytest.param(lambda m: dsx.prune(m, 0.5, skip=["nope"]), "nope", id="prune-skip-matches-nothing"),
    pytest.param(lambda m: dsx.sparsify(m, skip=["re:nope.*"]), "nope", id="sparsify-skip-matches-nothing"),
]


@pytest.mark.parametrize("call, match", WARNS)
def test_warns(call, match):
    model = mlp()
    snap = snapshot(model)
    with pytest.warns(UserWarning, match=match):
        call(model)
    assert_untouched(model, snap)
