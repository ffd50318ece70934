"""Support matrix of the Hugging Face zoo: runs every architecture x step of tests/zoo (the same registry and steps
as the tests) and writes the result into README.md between the zoo markers, so the README says what passes.
Run: python benchmarks/support_matrix.py [--archs bert,llama] [--steps quantize,export] [--no-write]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.zoo.zoo_models import ARCHS  # noqa: E402
from tests.zoo.zoo_steps import STEPS, Cell, matrix_section, replace_section, run_cell  # noqa: E402

README = ROOT / "README.md"


def one_line(error: BaseException) -> str:
    """The error's first line without terminal colour codes or table separators."""
    text = re.sub(r"\x1b\[[0-9;]*m|\[9\dm|\[0m", "", str(error)).strip()
    return f"{type(error).__name__}: {(text.splitlines() or [''])[0][:200]}".replace("|", "/")


def run_all(archs: list[str], steps: list[str], progress: bool = True) -> dict[tuple[str, str], Cell]:
    """Every cell of ``archs`` x ``steps``; a cell that raises is recorded as ``fails`` with the error."""
    cells = {}
    for name in archs:
        for step in steps:
            start = time.perf_counter()
            try:
                cell = run_cell(name, step)
            except Exception as e:  # the matrix records every failure; the tests raise it
                cell = Cell("fails", one_line(e))
            cells[name, step] = cell
            if progress:
                print(f"{name}-{step}: {cell.status} {cell.note} ({time.perf_counter() - start:.1f} s)", flush=True)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(a.name for a in ARCHS), help="comma-separated architectures")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated steps")
    parser.add_argument("--no-write", action="store_true", help="print the matrix, leave README.md as it is")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    archs, steps = args.archs.split(","), args.steps.split(",")
    unknown = sorted(set(archs) - {a.name for a in ARCHS}) + sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown architectures / steps: {unknown}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        section = matrix_section(run_all(archs, steps, progress=not args.no_progress))
    print(section)
    if args.no_write:
        return
    if set(archs) != {a.name for a in ARCHS} or set(steps) != set(STEPS):
        print("README.md: not written (only the whole zoo is written; pass --no-write with --archs / --steps)")
        return
    README.write_text(replace_section(README.read_text(), section))
    print("README.md: matrix written between the zoo markers")


if __name__ == "__main__":
    main()
