"""Bad input to dsx.quantize / dsx.Quantize / dsx.convert and the dsx.quant configs: a clear error naming the
argument (or a warning for a documented no-op), and the caller's model left exactly as it was."""

import pytest
import torch

import dsx
from dsx.quant import Int8Dynamic, Int8Static
from tests.bad_input.conftest import assert_refused, assert_untouched, case, mlp, nan_mlp, nan_x, snapshot, x

pytestmark = pytest.mark.timeout(60)




def qat_model():
    return dsx.quantize(mlp().train(), "int8", qat=True, progress=False)


def quantized():
    return dsx.quantize(mlp(), "int8", progress=False)


CASES = [
    # model
    case("model-list", lambda m: dsx.quantize([m], "int8"), "model"),
    case("model-state_dict", lambda m: dsx.quantize(m.state_dict(), "int8"), "model"),
    case("model-nan-weights", lambda m: dsx.quantize(m, "int8"), "model", make=nan_mlp),
    case("model-already-quantized", lambda m: dsx.quantize(m, "int8"), "model", make=quantized),
    case("model-already-quantized-qat", lambda m: dsx.quantize(m, "int8"), "model", make=qat_model),
    # config
    case("config-None", lambda m: dsx.quantize(m, None), "config"),
    case("config-int", lambda m: dsx.quantize(m, 8), "config"),
    case("config-float", lambda m: dsx.quantize(m, 8.0), "config"),
    case("config-bool", lambda m: dsx.quantize(m, True), "config"),
    case("config-unknown", lambda m: dsx.quantize(m, "int9"), "config"),
    case("config-empty", lambda m: dsx.quantize(m, ""), "config"),
    case("config-list", lambda m: dsx.quantize(m, ["int8"]), "config"),
    case("config-dict-unknown-format", lambda m: dsx.quantize(m, {"format": "int9"}), "config"),
    case("config-dict-no-format", lambda m: dsx.quantize(m, {}), "config"),
    case("config-embedding-only-name", lambda m: dsx.quantize(m, "embedding_only"), "config"),
    # the config classes
    case("Int8Static-observer-unknown", lambda m: dsx.quantize(m, Int8Static(observer="median")), "observer"),
    case("Int8Static-percentile-0", lambda m: dsx.quantize(m, Int8Static(observer="percentile", percentile=0)),
         "percentile"),
    case("Int8Static-percentile-101", lambda m: dsx.quantize(m, Int8Static(observer="percentile", percentile=101)),
         "percentile"),
    case("Int8Static-percentile-nan",
         lambda m: dsx.quantize(m, Int8Static(observer="percentile", percentile=float("nan"))), "percentile"),
    case("Int8Static-smoothquant-2", lambda m: dsx.quantize(m, Int8Static(smoothquant=2.0)), "smoothquant"),
    case("Int8Static-smoothquant-negative", lambda m: dsx.quantize(m, Int8Static(smoothquant=-0.5)), "smoothquant"),
    case("Int8Dynamic-dtype-float64", lambda m: dsx.quantize(m, Int8Dynamic(dtype="float64")), "dtype"),
    case("Int8Dynamic-embeddings-3", lambda m: dsx.quantize(m, Int8Dynamic(embeddings=3)), "embeddings"),
    # skip / filter_fn
    case("skip-str", lambda m: dsx.quantize(m, "int8", skip="0"), "skip"),
    case("skip-None", lambda m: dsx.quantize(m, "int8", skip=None), "skip"),
    case("skip-int", lambda m: dsx.quantize(m, "int8", skip=0), "skip"),
    case("filter_fn-str", lambda m: dsx.quantize(m, "int8", filter_fn="0"), "filter_fn"),
    case("filter_fn-bool", lambda m: dsx.quantize(m, "int8", filter_fn=True), "filter_fn"),
    # max_error / metric
    case("max_error-negative", lambda m: dsx.quantize(m, "int8", max_error=-0.1, example_inputs=x()), "max_error"),
    case("max_error-zero", lambda m: dsx.quantize(m, "int8", max_error=0, example_inputs=x()), "max_error"),
    case("max_error-nan", lambda m: dsx.quantize(m, "int8", max_error=float("nan"), example_inputs=x()),
         "max_error"),
    case("max_error-bool", lambda m: dsx.quantize(m, "int8", max_error=True, example_inputs=x()), "max_error"),
    case("max_error-str", lambda m: dsx.quantize(m, "int8", max_error="0.1", example_inputs=x()), "max_error"),
    case("max_error-without-data", lambda m: dsx.quantize(m, "int8", max_error=0.1), "max_error"),
    case("metric-unknown", lambda m: dsx.quantize(m, "int8", max_error=0.1, metric="l2", example_inputs=x()),
         "metric"),
    case("metric-int", lambda m: dsx.quantize(m, "int8", max_error=0.1, metric=2, example_inputs=x()), "metric"),
    case("metric-None", lambda m: dsx.quantize(m, "int8", metric=None), "metric"),
    # qat
    case("qat-unsupported-format", lambda m: dsx.quantize(m.train(False), "fp8", qat=True), "qat"),
    # calibration
    case("calibration-int", lambda m: dsx.quantize(m, "int8_static", calibration=5), "calibration"),
    case("calibration-tensor", lambda m: dsx.quantize(m, "int8_static", calibration=x()), "calibration"),
    case("calibration-str", lambda m: dsx.quantize(m, "int8_static", calibration="batches"), "calibration"),
    case("calibration-empty", lambda m: dsx.quantize(m, "int8_static", calibration=[]), "calibration"),
    case("calibration-missing", lambda m: dsx.quantize(m, "int8_static"), "calibration"),
    case("calibration-nan-batch", lambda m: dsx.quantize(m, "int8_static", calibration=[nan_x()]), "calibration"),
    case("calibration-str-batch", lambda m: dsx.quantize(m, "int8_static", calibration=["x"]), "calibration"),
    case("calibration-wrong-shape", lambda m: dsx.quantize(m, "int8_static", calibration=[torch.randn(4, 7)]),
         "calibration"),
    case("calibration-int-tensor", lambda m: dsx.quantize(m, "int8_static", calibration=[x().long()]),
         "calibration"),
    # example_inputs
    case("example_inputs-str", lambda m: dsx.quantize(m, "int8", example_inputs="x"), "example_inputs"),
    case("example_inputs-int", lambda m: dsx.quantize(m, "int8", example_inputs=3), "example_inputs"),
    case("example_inputs-empty-list", lambda m: dsx.quantize(m, "int8", example_inputs=[]), "example_inputs"),
    case("example_inputs-nan", lambda m: dsx.quantize(m, "int8", example_inputs=nan_x()), "example_inputs"),
    case("example_inputs-inf", lambda m: dsx.quantize(m, "int8", example_inputs=x() / 0), "example_inputs"),
    case("example_inputs-wrong-shape", lambda m: dsx.quantize(m, "int8", example_inputs=torch.randn(4, 7)),
         "example_inputs"),
    case("example_inputs-int-keys", lambda m: dsx.quantize(m, "int8", example_inputs={0: x()}), "example_inputs"),
    # flags
    case("inplace-str", lambda m: dsx.quantize(m, "int8", inplace="yes"), "inplace"),
    case("verify-int", lambda m: dsx.quantize(m, "int8", verify=1), "verify"),
    case("distributed-str", lambda m: dsx.quantize(m, "int8", distributed="auto"), "distributed"),
    case("distributed-True-no-group", lambda m: dsx.quantize(m, "int8", distributed=True), "distributed"),
    # Quantize(layers=...)
    case("layers-unknown", lambda m: dsx.Quantize("int8", layers=["nope"])(m), "layers"),
    # convert
    case("convert-not-qat", lambda m: dsx.convert(m), "model"),
    case("convert-model-str", lambda m: dsx.convert("model"), "model"),
    case("convert-example_inputs-str", lambda m: dsx.convert(m, "x"), "example_inputs", make=qat_model),
    case("convert-example_inputs-nan", lambda m: dsx.convert(m, nan_x()), "example_inputs", make=qat_model),
    case("convert-inplace-str", lambda m: dsx.convert(m, inplace="yes"), "inplace", make=qat_model),
    case("config-dict-bad-field", lambda m: dsx.quantize(m, {"format": "int8", "bogus": 1}), "config|bogus"),
    case("config-dict-format-int", lambda m: dsx.quantize(m, {"format": 8}), "config"),
]


@pytest.mark.parametrize("make, call, exc, match", CASES)
def test_refused(make, call, exc, match):
    assert_refused(make(), call, exc, match)


WARNS = [
    pytest.param(lambda m: dsx.quantize(m, "int8", skip=["nope"], progress=False), "nope", id="skip-matches-nothing"),
    pytest.param(lambda m: dsx.quantize(m, "int8", filter_fn=lambda n, mod: False, progress=False), "no layer",
                 id="filter_fn-rejects-all"),
    pytest.param(lambda m: dsx.quantize(m, "int8", skip=["0", "2"], progress=False), "no layer",
                 id="skip-everything"),
]


@pytest.mark.parametrize("call, match", WARNS)
def test_warns(call, match):
    model = mlp()
    snap = snapshot(model)
    with pytest.warns(UserWarning, match=match):
        call(model)
    assert_untouched(model, snap)
