"""The zoo's steps (optimize, quantize, prune, sparsify, export, compile, save/load) as checks on one architecture,
and the documented refusals, shared by tests/zoo/test_zoo.py and benchmarks/support_matrix.py.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch._inductor.config
import torch.nn as nn
import torch.utils._pytree as pytree

import dsx
from dsx.graph.backend import dsx_backend
from tests.zoo.zoo_models import BY_NAME, Arch, Inputs, build, pick

REL_TOL = 1e-4
MIN_COSINE = 0.99


def max_rel(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    ref, new = reference.detach().double(), candidate.detach().double()
    return float((ref - new).abs().max() / ref.abs().max().clamp_min(1e-12))


def min_row_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """The smallest cosine similarity between matching rows (last dim) of the two tensors."""
    ref, new = (t.detach().double().reshape(-1, t.shape[-1]) for t in (reference, candidate))
    return float(torch.nn.functional.cosine_similarity(ref, new, dim=1).min())


def run(arch: Arch, model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The checked output of ``model`` on ``inputs``."""
    with torch.no_grad():
        out = pick(arch, model(**inputs))
    assert isinstance(out, torch.Tensor) and out.isfinite().all(), f"{arch.name}: {arch.output} is not finite"
    return out


def shapes(outputs: Any) -> list[tuple[int, ...]]:
    """The shapes of every tensor in a model's outputs (a cache's tensors included)."""
    if hasattr(outputs, "to_tuple"):
        outputs = outputs.to_tuple()
    return [tuple(t.shape) for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]


FULL_SEARCH = ("bert", "resnet")
"""The architectures whose optimize cell runs the default search, compiled plan included; the others pass
``compile=False`` (the compile cell compiles them; a second compile per model would double the zoo's CI time)."""


def step_optimize(arch: Arch, model: nn.Module, inputs: Inputs, tmp: Path) -> str:
    """The lossless search (default ``max_error``): same class, outputs within fp32 rounding."""
    ref = run(arch, model, inputs)
    full = arch.name in FULL_SEARCH
    fast = dsx.optimize(model, inputs, progress=False, **({} if full else {"compile": False}))
    assert isinstance(fast, type(model))
    err = max_rel(ref, run(arch, fast, inputs))
    assert err <= REL_TOL, f"optimize: {arch.output} drifted by {err:.2e} relative"
    rows = {r.plan: r for r in dsx.report(fast).rows}
    if full:  # the compiled plan was built and verified (its timing against the original is the machine's)
        assert rows["compile"].status == "ok", f"optimize: compiled plan {rows['compile'].status}"
    return f"picked {dsx.report(fast).winner.plan}, max rel {err:.1e}"


def step_quantize(arch: Arch, model: nn.Module, inputs: Inputs, tmp: Path) -> str:
    """``int8``: every output row at cosine >= 0.99 to fp32 on an output that varies."""
    ref = run(arch, model, inputs)
    assert float(ref.std()) > 0, f"{arch.name}: {arch.output} is constant, the check would compare nothing"
    q = dsx.quantize(model, "int8", example_inputs=inputs, progress=False)
    cos = min_row_cosine(ref, run(arch, q, inputs))
    assert cos >= MIN_COSINE, f"int8: min row cosine {cos:.4f}"
    return f"cosine {cos:.4f}"


def step_prune(arch: Arch, model: nn.Module, inputs: Inputs, tmp: Path) -> str:
    """30% structured pruning: the pruned model runs on the inputs with the original's output shapes."""
    with torch.no_grad():
        before = shapes(model(**inputs))
    pruned = dsx.prune(model, 0.3, structured=True, example_inputs=inputs)
    run(arch, pruned, inputs)
    with torch.no_grad():
        after = shapes(pruned(**inputs))
    assert after == before, f"prune: output shapes {before} -> {after}"
    return f"{dsx.history(pruned)[-1]['info']['ratio']:.0%} removed"


def step_sparsify(arch: Arch, model: nn.Module, inputs: Inputs, tmp: Path) -> str:
    """2:4 masks: the model still runs, with the original's output shapes."""
    with torch.no_grad():
        before = shapes(model(**inputs))
    sparse = dsx.sparsify(model, "2:4")
    run(arch, sparse, inputs)
    with torch.no_grad():
        assert shapes(sparse(**inputs)) == before
    return ""


def step_export(arch: Arch, model: nn.Module, inputs: Inputs, tmp: Path) -> str:
    """ONNX export, verified by ``dsx.export`` itself in onnxruntime (fp32: 1e-4 relative)."""
    result = dsx.export(model, inputs, tmp / "m.onnx")
    assert Path(result.path).is_file()
    return ""


def step_compile(arch: Arch, model: nn.Module, inputs: Inputs, tmp: Path) -> str:
    """``torch.compile(backend="dsx")`` runs the dsx passes on every graph (none left to plain inductor) and matches
    eager within fp32 rounding."""
    ref = run(arch, model, inputs)
    seen = {id(r) for r in dsx_backend.reports}
    torch._dynamo.reset()
    try:  # CI time: one C++ file per graph (cpp_wrapper) builds in 0.8x the CPU time of a file per kernel, and in
        # this process (a pool of compile workers would only compete for the CPUs with xdist's)
        with torch._inductor.config.patch(cpp_wrapper=True, compile_threads=1):
            err = max_rel(ref, run(arch, torch.compile(model, backend="dsx"), inputs))
    finally:
        torch._dynamo.reset()
    reports = [r for r in dsx_backend.reports if id(r) not in seen]
    assert reports, "compile: the dsx backend compiled no graph"
    skipped = [r["skipped"] for r in reports if "skipped" in r]
    assert not skipped, f"compile: {len(skipped)} graph(s) compiled without the dsx passes: {skipped[0]}"
    assert err <= REL_TOL, f"compile: {arch.output} drifted by {err:.2e} relative"
    fused = sum(n for r in reports for n in r["fusions"].values())
    return f"{len(reports)} graph(s), {fused} rewrites, max rel {err:.1e}"


def step_save_load(arch: Arch, model: nn.Module, inputs: Inputs, tmp: Path) -> str:
    """An int8 model saved and loaded into a fresh instance gives bit-identical outputs."""
    q = dsx.quantize(model, "int8", example_inputs=inputs, progress=False)
    dsx.save(q, tmp / "m.dsx")
    fresh, _ = build(arch.name)
    again = dsx.load(fresh, tmp / "m.dsx")
    assert type(again) is type(model)
    assert torch.equal(run(arch, q, inputs), run(arch, again, inputs)), "save/load: outputs changed"
    return ""


STEPS: dict[str, Callable[[Arch, nn.Module, Inputs, Path], str]] = {
    "optimize": step_optimize,
    "quantize": step_quantize,
    "prune": step_prune,
    "sparsify": step_sparsify,
    "export": step_export,
    "compile": step_compile,
    "save_load": step_save_load,
}


@dataclass(frozen=True)
class Refusal:
    """A cell dsx refuses on purpose: the step raises ``error`` with a message matching ``match`` (the reason)."""

    error: type[Exception]
    match: str
    reason: str


REFUSALS: dict[tuple[str, str], Refusal] = {}
"""(architecture, step) -> the documented refusal; at most 10% of the cells."""


@dataclass(frozen=True)
class Cell:
    """The outcome of one architecture x step: ``"pass"`` or ``"refused"``, and a short note."""

    status: str
    note: str


def run_cell(name: str, step: str, tmp: Path | None = None) -> Cell:
    """Run ``step`` on a fresh ``name`` model. A pass, or for a documented refusal, the refusal's error (any other
    outcome raises: an ``AssertionError`` if a refused cell now passes)."""
    arch = BY_NAME[name]
    model, inputs = build(name)
    with tempfile.TemporaryDirectory() if tmp is None else contextlib.nullcontext(tmp) as where:
        refusal = REFUSALS.get((name, step))
        if refusal is None:
            return Cell("pass", STEPS[step](arch, model, inputs, Path(where)))
        try:
            STEPS[step](arch, model, inputs, Path(where))
        except refusal.error as e:
            assert re.search(refusal.match, str(e)), f"{name}-{step}: refused with another reason: {e}"
            return Cell("refused", refusal.reason)
        raise AssertionError(f"{name}-{step}: documented as refused ({refusal.reason}) but passed: update REFUSALS")



STEP_TITLES = {"optimize": "optimize", "quantize": "int8", "prune": "prune", "sparsify": "2:4", "export": "ONNX",
               "compile": "compile", "save_load": "save/load"}


def expected(name: str, step: str) -> Cell:
    """What a passing run of the cell gives: a pass, or its documented refusal (the support matrix's cell)."""
    refusal = REFUSALS.get((name, step))
    return Cell("pass", "") if refusal is None else Cell("refused", refusal.reason)


def render_matrix(cells: dict[tuple[str, str], Cell]) -> str:
    """The support matrix as a Markdown table: one row per architecture (class, family), one column per step."""
    steps = [s for s in STEPS if any(k[1] == s for k in cells)]
    rows = ["| architecture | class | family | " + " | ".join(STEP_TITLES[s] for s in steps) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in steps) + " |"]
    for arch in (a for a in BY_NAME.values() if any(k[0] == a.name for k in cells)):
        model, _ = build(arch.name)
        marks = []
        for s in steps:
            cell = cells.get((arch.name, s))
            marks.append("-" if cell is None else {"pass": "yes", "refused": f"refused: {cell.note}"}.get(
                cell.status, f"**fails**: {cell.note}"))
        rows.append(f"| {arch.name} | `{type(model).__name__}` | {arch.family} | " + " | ".join(marks) + " |")
    counts = {status: sum(c.status == status for c in cells.values()) for status in ("pass", "refused", "fails")}
    summary = (f"{len({k[0] for k in cells})} architectures x {len(steps)} steps: {counts['pass']} pass, "
               f"{counts['refused']} refused" + (f", {counts['fails']} fail" if counts["fails"] else ""))
    return "\n".join(rows) + "\n\n" + summary + "."


BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"
INTRO = ("The Hugging Face zoo (`tests/zoo`, one test per cell): tiny models built from configs (2 layers, hidden "
         "64, vocab 100, 32x32 images) go through `dsx.optimize` (lossless: same class, outputs within 1e-4), "
         "`dsx.quantize` int8 (row cosine >= 0.99), 30% structured `dsx.prune`, `dsx.sparsify` 2:4, `dsx.export` to "
         "ONNX (verified in onnxruntime), `torch.compile` with the dsx backend (within 1e-4) and `dsx.save` / "
         "`dsx.load` of the int8 model (bit-exact). Written by `python benchmarks/support_matrix.py`.")


def matrix_section(cells: dict[tuple[str, str], Cell]) -> str:
    """What README.md holds between the zoo markers for ``cells``."""
    return f"\n{INTRO}\n\n{render_matrix(cells)}\n"


def readme_section(text: str) -> str:
    """The text between README.md's zoo markers.

    Raises:
        ValueError: the markers are missing, repeated or out of order.
    """
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README.md: expected one {BEGIN} ... {END} pair")
    return text.split(BEGIN)[1].split(END)[0]


def replace_section(text: str, section: str) -> str:
    """``text`` with the part between the zoo markers replaced by ``section``."""
    readme_section(text)
    head, rest = text.split(BEGIN)
    return head + BEGIN + section + END + rest.split(END)[1]
