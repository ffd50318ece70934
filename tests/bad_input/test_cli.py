"""Bad input to the ``dsx`` command line (``python -m dsx``): a usage error (exit 2) or a one-line ``dsx: error:``
(exit 1, no traceback) naming the option or argument, and the files in the working directory left as they were.

Each case is one subprocess (seconds: importing torch); two run at a time (see ``Runner``).
"""

import os
import subprocess
import sys

import pytest

from tests.bad_input.conftest import tree_digest

pytestmark = pytest.mark.timeout(60)

RESNET = ["dsx.models:TinyResNet", "--input-shape", "2,3,32,32"]

# id: (argv after "python -m dsx --no-progress", exit code, what stderr must name)
CASES = {
    "optimize-input-shape-not-numbers": (["optimize", "dsx.models:TinyResNet", "--input-shape", "2,3,x"], 2,
                                         "--input-shape"),
    "optimize-input-dtype-unknown": (["optimize", *RESNET, "--input-dtype", "float99"], 2, "--input-dtype"),
    "optimize-max-error-negative": (["optimize", *RESNET, "--max-error", "-1"], 2, "--max-error"),
    "optimize-prune-above-one": (["optimize", *RESNET, "--prune", "1.5"], 2, "--prune"),
    "export-opset-zero": (["export", *RESNET, "out.onnx", "--opset", "0"], 2, "--opset"),
    "optimize-model-module-missing": (["optimize", "no_such_pkg.models:build", "--input-shape", "2,8"], 1, "MODEL"),
    "export-path-unknown-suffix": (["export", *RESNET, "out.tflite"], 1, "path"),
    "optimize-formats-unknown": (["optimize", *RESNET, "--max-error", "0.1", "--formats", "int9"], 1, "formats"),
    "summary-corrupt-save": (["summary", "saved"], 1, "dsx.json"),
}


def _prepare(case: str, where):
    if case == "summary-corrupt-save":
        (where / "saved").mkdir()
        (where / "saved" / "dsx.json").write_text("{not json")
        (where / "saved" / "model.safetensors").write_bytes(b"\x00" * 16)


class Runner:
    """Starts the cases in order, two at a time: while one test waits for its own command the next one is already
    running, so the suite takes about half the sum of the commands' times, and no test waits for more than its own
    command and the one before it."""

    def __init__(self, tmp_path_factory, order):
        self.factory, self.order, self.started = tmp_path_factory, order, {}
        # Under xdist another worker may run the next case: start only this worker's own.
        self.ahead = 0 if os.environ.get("PYTEST_XDIST_WORKER") else 1

    def _start(self, case):
        argv = CASES[case][0]
        where = self.factory.mktemp(case)
        _prepare(case, where)
        before = tree_digest(where)
        proc = subprocess.Popen([sys.executable, "-m", "dsx", "--no-progress", *argv], cwd=where,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.started[case] = (proc, where, before)

    def get(self, case):
        i = self.order.index(case)
        for name in self.order[i: i + 1 + self.ahead]:
            if name not in self.started:
                self._start(name)
        return self.started[case]

    def close(self):
        for proc, _, _ in self.started.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The cases this session collected, in their order (a -k selection starts nothing else)."""
    order = [item.callspec.params["case"] for item in request.session.items
             if item.module is request.module and hasattr(item, "callspec")]
    runner = Runner(tmp_path_factory, order)
    yield runner
    runner.close()


@pytest.mark.parametrize("case", list(CASES))
def test_cli_refuses(case, runs):
    _, code, names = CASES[case]
    proc, where, before = runs.get(case)
    out, err = proc.communicate(timeout=55)
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout: {out}\nstderr: {err}"
    assert names in err, err
    assert "Traceback" not in err, err
    if code == 1:
        assert err.strip().splitlines()[-1].startswith("dsx: error: "), err
    assert tree_digest(where) == before, "the refused command changed or wrote files"
