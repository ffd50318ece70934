"""Bad input to dsx.distill / dsx.Distill and dsx.compress.DistillationLoss: a clear error naming the argument, and
both the caller's teacher and student left exactly as they were."""

import pytest
import torch
import torch.nn as nn

import dsx
from dsx.compress import DistillationLoss
from tests.bad_input.conftest import BAD, assert_untouched, mlp, nan_mlp, nan_x, snapshot, x

pytestmark = pytest.mark.timeout(60)



def student():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 32))


def frozen():
    s = student()
    for p in s.parameters():
        p.requires_grad_(False)
    return s


def narrow():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def y():
    return torch.randint(0, 32, (4,))


def data():
    return [(x(), y())]


def case(id, call, match, exc=BAD, teacher=mlp, student=student):
    return pytest.param(teacher, student, call, exc, match, id=id)


def d(t, s, **kw):
    """dsx.distill with quiet defaults; ``kw`` overrides them."""
    kw = {"data": data(), "progress": False, **kw}
    return dsx.distill(t, s, kw.pop("data"), **kw)


CASES = [
    # teacher / student
    case("teacher-str", lambda t, s: d("teacher", s), "teacher"),
    case("teacher-None", lambda t, s: d(None, s), "teacher"),
    case("teacher-list", lambda t, s: d([t], s), "teacher"),
    case("student-nan-weights", lambda t, s: d(t, s), "model", student=nan_mlp),
    case("student-frozen", lambda t, s: d(t, s), "student", student=frozen),
    case("student-teacher-logits-differ", lambda t, s: d(t, s), "teacher", student=narrow),
    # data
    case("data-None", lambda t, s: d(t, s, data=None), "data"),
    case("data-tensor", lambda t, s: d(t, s, data=x()), "data"),
    case("data-dict", lambda t, s: d(t, s, data={"x": x()}), "data"),
    case("data-int", lambda t, s: d(t, s, data=5), "data"),
    case("data-str", lambda t, s: d(t, s, data="batches"), "data"),
    case("data-empty", lambda t, s: d(t, s, data=[]), "data"),
    case("data-iterator-two-epochs", lambda t, s: d(t, s, data=iter(data()), epochs=2), "data"),
    case("data-target-str", lambda t, s: d(t, s, data=[(x(), "labels")]), "data"),
    case("data-triple", lambda t, s: d(t, s, data=[(x(), y(), y())]), "data"),
    case("data-int-batch", lambda t, s: d(t, s, data=[3]), "data"),
    case("data-nan-batch", lambda t, s: d(t, s, data=[(nan_x(), y())]), "data"),
    case("data-str-input", lambda t, s: d(t, s, data=[("x", y())]), "data"),
    case("data-empty-generator", lambda t, s: d(t, s, data=(b for b in [])), "data"),
    # epochs / temperature / alpha / lr / feature_weight
    case("epochs-zero", lambda t, s: d(t, s, epochs=0), "epochs"),
    case("epochs-negative", lambda t, s: d(t, s, epochs=-1), "epochs"),
    case("epochs-float", lambda t, s: d(t, s, epochs=1.5), "epochs"),
    case("epochs-bool", lambda t, s: d(t, s, epochs=True), "epochs"),
    case("epochs-str", lambda t, s: d(t, s, epochs="2"), "epochs"),
    case("temperature-zero", lambda t, s: d(t, s, temperature=0), "temperature"),
    case("temperature-negative", lambda t, s: d(t, s, temperature=-4.0), "temperature"),
    case("temperature-nan", lambda t, s: d(t, s, temperature=float("nan")), "temperature"),
    case("temperature-str", lambda t, s: d(t, s, temperature="4"), "temperature"),
    case("temperature-None", lambda t, s: d(t, s, temperature=None), "temperature"),
    case("alpha-negative", lambda t, s: d(t, s, alpha=-0.1), "alpha"),
    case("alpha-above-one", lambda t, s: d(t, s, alpha=1.5), "alpha"),
    case("alpha-nan", lambda t, s: d(t, s, alpha=float("nan")), "alpha"),
    case("alpha-bool", lambda t, s: d(t, s, alpha=True), "alpha"),
    case("alpha-zero-no-target", lambda t, s: d(t, s, alpha=0.0, data=[x()]), "alpha"),
    case("lr-zero", lambda t, s: d(t, s, lr=0), "lr"),
    case("lr-negative", lambda t, s: d(t, s, lr=-1e-3), "lr"),
    case("lr-nan", lambda t, s: d(t, s, lr=float("nan")), "lr"),
    case("lr-str", lambda t, s: d(t, s, lr="1e-3"), "lr"),
    case("feature_weight-negative", lambda t, s: d(t, s, feature_weight=-1.0), "feature_weight"),
    case("feature_weight-str", lambda t, s: d(t, s, feature_weight="1"), "feature_weight"),
    # features
    case("features-str", lambda t, s: d(t, s, features="0"), "features"),
    case("features-list", lambda t, s: d(t, s, features=["0", "0"]), "features"),
    case("features-int-value", lambda t, s: d(t, s, features={"0": 0}), "features"),
    case("features-unknown-student-layer", lambda t, s: d(t, s, features={"nope": "0"}), "features"),
    case("features-unknown-teacher-layer", lambda t, s: d(t, s, features={"0": "nope"}), "features"),
    # optimizer / loss_fn
    case("optimizer-str", lambda t, s: d(t, s, optimizer="adam"), "optimizer"),
    case("optimizer-int", lambda t, s: d(t, s, optimizer=1), "optimizer"),
    case("optimizer-callable-returns-int", lambda t, s: d(t, s, optimizer=lambda params: 1), "optimizer"),
    case("optimizer-over-other-params",
         lambda t, s: d(t, s, optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)), "optimizer"),
    case("loss_fn-str", lambda t, s: d(t, s, loss_fn="cross_entropy"), "loss_fn"),
    # flags
    case("inplace-str", lambda t, s: d(t, s, inplace="yes"), "inplace"),
    # Distill directly
    case("Distill-no-teacher", lambda t, s: dsx.Distill(data=data(), progress=False)(s), "teacher"),
    case("Distill-example_inputs-str", lambda t, s: dsx.Distill(t, data(), progress=False)(s, "x"), "example_inputs"),
    case("Distill-example_inputs-nan", lambda t, s: dsx.Distill(t, data(), progress=False)(s, nan_x()),
         "example_inputs"),
    case("Distill-verify-str", lambda t, s: dsx.Distill(t, data(), progress=False, verify="no")(s), "verify"),
    # DistillationLoss
    case("DistillationLoss-features-without-models", lambda t, s: DistillationLoss(features={"0": "0"}, student=s),
         "features"),
    case("DistillationLoss-features-unknown-layer",
         lambda t, s: DistillationLoss(features={"0": "nope"}, student=s, teacher=t), "features"),
    case("DistillationLoss-temperature-zero", lambda t, s: DistillationLoss(temperature=0, student=s, teacher=t),
         "temperature"),
    case("DistillationLoss-feature_weight-negative",
         lambda t, s: DistillationLoss(feature_weight=-1, student=s, teacher=t), "feature_weight"),
    case("DistillationLoss-loss_fn-int", lambda t, s: DistillationLoss(loss_fn=3), "loss_fn"),
    case("DistillationLoss-mask-wrong-shape", lambda t, s: DistillationLoss()(s(x()), t(x()), mask=torch.ones(3)),
         "mask"),
    case("DistillationLoss-target-wrong-shape",
         lambda t, s: DistillationLoss()(s(x()), t(x()), torch.zeros(3, dtype=torch.long)), "target"),
    case("data-inf-target", lambda t, s: d(t, s, data=[(x(), torch.full((4, 32), float("inf")))]), "data"),
    case("device-unknown", lambda t, s: d(t, s, device="gpu9"), "device"),
    case("device-int", lambda t, s: d(t, s, device=3.5), "device"),
    case("features-dict-key-int", lambda t, s: d(t, s, features={0: "0"}), "features"),
]


@pytest.mark.parametrize("make_teacher, make_student, call, exc, match", CASES)
def test_refused(make_teacher, make_student, call, exc, match):
    teacher, student = make_teacher(), make_student()
    snaps = snapshot(teacher), snapshot(student)
    with pytest.raises(exc, match=match):
        call(teacher, student)
    assert_untouched(teacher, snaps[0])
    assert_untouched(student, snaps[1])
