"""Regression cases for the bad inputs the first run of this suite found unclear or accepted: each now raises a
clear error naming the argument, before anything is written, and leaves the caller's model and files alone."""

import itertools

import pytest
import torch

import dsx
from dsx.compress.distill import distill
from dsx.parallel import load_checkpoint, save_checkpoint
from tests.bad_input.conftest import (BAD, Raising, assert_refused, assert_untouched, convnet, img, mlp, nan_mlp,
                                      snapshot, tree_digest, x)

pytestmark = pytest.mark.timeout(60)



def student():
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 32))


def labels():
    return [(x(), torch.randint(0, 32, (4,)))]


CASES = [
    ("optimize-inplace-str", lambda m, d: dsx.optimize(m, x(), compile=False, progress=False, inplace="no"), "inplace"),
    ("optimize-progress-str", lambda m, d: dsx.optimize(m, x(), compile=False, progress="no"), "progress"),
    ("optimize-passes-int", lambda m, d: dsx.optimize(m, x(), compile=False, progress=False, passes=5), "passes"),
    ("optimize-passes-bool", lambda m, d: dsx.optimize(m, x(), compile=False, progress=False, passes=True), "passes"),
    ("optimize-prune-out-of-range", lambda m, d: dsx.optimize(m, x(), compile=False, progress=False, prune=1.5),
     "prune: amount"),
    ("optimize-sparsity-unknown", lambda m, d: dsx.optimize(m, x(), compile=False, progress=False, sparsity="1:4"),
     "sparsity: pattern"),
    ("optimize-quantize-unknown", lambda m, d: dsx.optimize(m, x(), compile=False, progress=False, quantize="int9"),
     "quantize: config"),
    ("optimize-quantize-int", lambda m, d: dsx.optimize(m, x(), compile=False, progress=False, quantize=8),
     "quantize: config"),
    ("quantize-skip-int-item", lambda m, d: dsx.quantize(m, "int8", skip=[0]), "skip: expected module names"),
    ("quantize-skip-bad-regex", lambda m, d: dsx.quantize(m, "int8", skip=["re:("]), "skip: 're:\\(' is not a valid"),
    ("quantize-qat-str", lambda m, d: dsx.quantize(m, "int8", qat="no"), "qat"),
    ("quantize-progress-str", lambda m, d: dsx.quantize(m, "int8", progress="no"), "progress"),
    ("quantize-layers-str", lambda m, d: dsx.Quantize("int8", layers="0")(m), "layers"),
    ("quantize-max_error-nan", lambda m, d: dsx.quantize(m, "int8", max_error=float("nan")), "max_error"),
    ("prune-skip-None", lambda m, d: dsx.prune(m, 0.5, skip=None), "skip"),
    ("prune-skip-int", lambda m, d: dsx.prune(m, 0.5, skip=0), "skip"),
    ("prune-skip-int-item", lambda m, d: dsx.prune(m, 0.5, skip=[0]), "skip"),
    ("prune-skip-bad-regex", lambda m, d: dsx.prune(m, 0.5, skip=["re:("]), "skip"),
    ("prune-max_error-nan", lambda m, d: dsx.prune(m, 0.5, max_error=float("nan")), "max_error"),
    ("prune-layers-str", lambda m, d: dsx.Prune(0.5, layers="0")(m), "layers"),
    ("sparsify-skip-None", lambda m, d: dsx.sparsify(m, skip=None), "skip"),
    ("sparsify-max_error-nan", lambda m, d: dsx.sparsify(m, max_error=float("nan")), "max_error"),
    ("sparsify-layers-str", lambda m, d: dsx.Sparsify(layers="0")(m), "layers"),
    ("export-nan-weights", lambda m, d: dsx.export(nan_mlp(), x(), d / "m.pt2"), "model: parameter"),
    ("export-path-None", lambda m, d: dsx.export(m, x(), None), "path"),
    ("export-path-int", lambda m, d: dsx.export(m, x(), 5), "path"),
    ("export-path-is-a-dir", lambda m, d: dsx.export(m, x(), d / "dir.pt2"), "path: .* is a directory"),
    ("export-parent-is-a-file", lambda m, d: dsx.export(m, x(), d / "file" / "m.pt2"), "path: .* is a file"),
    ("export-dynamic_shapes-str", lambda m, d: dsx.export(m, x(), d / "m.pt2", dynamic_shapes="dynamic"),
     "dynamic_shapes"),
    ("export-dynamic_shapes-int", lambda m, d: dsx.export(m, x(), d / "m.pt2", dynamic_shapes=0), "dynamic_shapes"),
    ("export-verify-str", lambda m, d: dsx.export(m, x(), d / "m.pt2", verify="no"), "verify"),
    ("capture-dynamic_batch-str", lambda m, d: dsx.capture(m, x(), dynamic_batch="no"), "dynamic_batch"),
    ("capture-fixed_kwargs-str", lambda m, d: dsx.capture(m, x(), fixed_kwargs="x"), "fixed_kwargs"),
    ("capture-fixed_kwargs-unknown", lambda m, d: dsx.capture(m, x(), fixed_kwargs={"bogus": 1}),
     "fixed_kwargs: the model's forward takes no argument 'bogus'"),
    ("capture-dynamic_shapes-str", lambda m, d: dsx.capture(m, x(), dynamic_shapes="dynamic"), "dynamic_shapes"),
    ("capture-dynamic_shapes-int", lambda m, d: dsx.capture(m, x(), dynamic_shapes=3), "dynamic_shapes"),
    ("distill-student-str", lambda m, d: distill(m, "student", labels(), progress=False), "student"),
    ("distill-progress-str", lambda m, d: distill(m, student(), labels(), progress="no"), "progress"),
    ("distill-nan-teacher", lambda m, d: distill(nan_mlp(), student(), labels(), progress=False), "teacher"),
    ("save-path-None", lambda m, d: dsx.save(m, None), "path"),
    ("save-path-int", lambda m, d: dsx.save(m, 3), "path"),
    ("save-parent-is-a-file", lambda m, d: dsx.save(m, d / "file" / "new"), "path: .* is a file"),
    ("load-path-None", lambda m, d: dsx.load(m, None), "path"),
    ("load-path-int", lambda m, d: dsx.load(m, 7), "path"),
    ("save_checkpoint-path-None", lambda m, d: save_checkpoint(None, m, step=1), "path"),
    ("save_checkpoint-path-is-a-file", lambda m, d: save_checkpoint(d / "file", m, step=1), "path: .* is a file"),
    ("load_checkpoint-path-None", lambda m, d: load_checkpoint(None, m), "path"),
    ("compress_gradients-not-ddp", lambda m, d: dsx.parallel.compress_gradients(m, "int8"), "ddp_model"),
    ("quantize-max_batches-zero", lambda m, d: dsx.quantize(m, "int8", max_batches=0), "max_batches"),
    ("quantize-max_batches-float", lambda m, d: dsx.quantize(m, "int8", max_batches=2.5), "max_batches"),
    ("quantize-max_batches-bool", lambda m, d: dsx.quantize(m, "int8", max_batches=True), "max_batches"),
    ("quantize-metric-nan", lambda m, d: dsx.quantize(m, "int8", max_error=0.1, metric=lambda mod: float("nan"),
                                                      example_inputs=x(), progress=False), "metric: .* returned nan"),
    ("quantize-metric-raises", lambda m, d: dsx.quantize(m, "int8", max_error=0.1, metric=lambda mod: 1 / 0,
                                                         example_inputs=x(), progress=False),
     "metric: the callable raised ZeroDivisionError"),
    ("quantize-filter_fn-raises", lambda m, d: dsx.quantize(m, "int8", filter_fn=lambda n, mod: 1 / 0),
     "filter_fn: raised ZeroDivisionError on layer '0'"),
    ("quantize-filter_fn-not-bool", lambda m, d: dsx.quantize(m, "int8", filter_fn=lambda n, mod: "no"),
     "filter_fn: must return True or False"),
    ("optimize-workload-raises", lambda m, d: dsx.optimize(m, x(), compile=False, progress=False,
                                                           workload=lambda mod: 1 / 0),
     "workload: raised ZeroDivisionError on the original model"),
    ("distill-teacher-wrong-shape",
     lambda m, d: distill(m, student(), [(torch.randn(4, 7), torch.zeros(4).long())], progress=False),
     "teacher: raised RuntimeError on data batch 0"),
    ("distill-loss_fn-raises", lambda m, d: distill(m, student(), labels(), loss_fn=lambda a, b: 1 / 0, progress=False),
     "loss_fn: raised ZeroDivisionError"),
    ("distill-student-raises", lambda m, d: distill(m, Raising(), labels(), progress=False),
     "student: raised RuntimeError on data batch 0"),
    ("schedule-step-not-a-model", lambda m, d: dsx.PruningSchedule(start=0, end=10, steps=5, amount=0.5).step("m", 5),
     "model"),
    ("prepare_for_ddp-not-a-model", lambda m, d: dsx.parallel.prepare_for_ddp("model"), "model"),
    ("full_state_dict-not-a-model", lambda m, d: dsx.parallel.full_state_dict("model"), "model"),
    ("compile_backend-unknown-option", lambda m, d: dsx.compile_backend(not_an_inductor_option=1),
     "not_an_inductor_option: not a torch._inductor.config option"),
]


@pytest.mark.parametrize("call, match", [pytest.param(c, m, id=i) for i, c, m in CASES])
def test_refused_with_the_argument_named(tmp_path, call, match):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.pt2").mkdir()
    files = tree_digest(tmp_path)
    assert_refused(mlp(), call, BAD, match, tmp_path)
    assert tree_digest(tmp_path) == files


def test_taylor_calibration_that_is_not_an_iterable():
    model = convnet()
    snap = snapshot(model)
    with pytest.raises(TypeError, match="calibration: expected an iterable of batches"):
        dsx.prune(model, 0.5, structured=True, importance="taylor", calibration=5, example_inputs=img())
    assert_untouched(model, snap)


def test_an_endless_iterator_is_cut_at_max_batches():
    model = convnet()
    snap = snapshot(model)
    with pytest.warns(UserWarning, match="read the first"):
        dsx.prune(model, 0.5, structured=True, importance="taylor", calibration=itertools.repeat(img()),
                  example_inputs=img())
    assert_untouched(model, snap)
