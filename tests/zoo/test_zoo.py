"""The Hugging Face zoo: every architecture of tests/zoo/zoo_models.py through every dsx step (one test per cell,
ids like ``llama-quantize``), so a change that breaks one family shows up, and the README's matrix stays true.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.zoo.zoo_models import ARCHS  # noqa: E402
from tests.zoo.zoo_steps import REFUSALS, STEPS, expected, matrix_section, readme_section, run_cell  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CELLS = [pytest.param(a.name, s, id=f"{a.name}-{s}") for a in ARCHS for s in STEPS]


@pytest.mark.parametrize("name,step", CELLS)
def test_cell(name: str, step: str, tmp_path: Path) -> None:
    """The step passes its check, or raises its documented refusal (``run_cell`` raises on anything else)."""
    cell, want = run_cell(name, step, tmp_path), expected(name, step)
    assert cell.status == want.status and (cell.status == "pass" or cell.note == want.note)


def test_zoo_covers_the_families_and_refuses_little() -> None:
    families = {a.family for a in ARCHS}
    assert len(ARCHS) >= 30 and len({a.name for a in ARCHS}) == len(ARCHS)
    assert {"text encoder", "decoder", "encoder-decoder", "vision", "audio", "multimodal"} <= families
    assert len(REFUSALS) <= 0.1 * len(CELLS)
    for (name, step), refusal in REFUSALS.items():
        assert step in STEPS and any(a.name == name for a in ARCHS)
        assert issubclass(refusal.error, (ValueError, TypeError)) and refusal.reason


def test_readme_matrix_is_the_zoos() -> None:
    """README.md's matrix is what the cells above assert (regenerate it with benchmarks/support_matrix.py)."""
    cells = {(a.name, s): expected(a.name, s) for a in ARCHS for s in STEPS}
    assert readme_section((ROOT / "README.md").read_text()) == matrix_section(cells)


def test_support_matrix_script_runs_a_cell(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("support_matrix", ROOT / "benchmarks" / "support_matrix.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["support_matrix.py", "--archs", "bert", "--steps", "prune", "--no-write",
                                      "--no-progress"])
    script.main()
    out = capsys.readouterr().out
    assert "| bert | `BertModel` | text encoder | yes |" in out and "1 pass, 0 refused" in out
