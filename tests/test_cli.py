import subprocess
import sys

import pytest

from dsx.cli import main
from dsx.graph.pass_manager import available_passes


def test_passes_lists_every_pass_in_order(capsys):
    assert main(["passes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == list(available_passes())


def test_python_dash_m_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "dsx", "passes"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "attention_to_sdpa" in res.stdout


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--iters", "0"])
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "invalid choice" in capsys.readouterr().err
