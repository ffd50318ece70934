"""The package's layers import downward only: core, kernels <- graph, quant <- compress <- export, parallel, auto
<- api, cli. Walks every import statement in dsx/ (function-level ones included) and checks each edge."""

import ast
from pathlib import Path

import dsx

LOWER = {"core", "kernels"}
ALLOWED = {
    "core": set(),
    "kernels": {"core"},
    "graph": LOWER,
    "quant": LOWER,
    "compress": LOWER | {"quant"},
    "export": LOWER | {"graph", "quant", "compress"},
    "parallel": LOWER | {"graph", "quant", "compress"},
    "auto": LOWER | {"graph", "quant", "compress"},
    "models": {"core"},
    "pretrained": {"core"},
}
"""What each part may import; the top (``__init__``, ``__main__``, ``api``, ``cli``, ``cli_models``, ``demo``) may
import anything."""

ROOT = Path(dsx.__file__).parent


def imports(path: Path) -> set[str]:
    """The dsx parts (first name under ``dsx``) ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "dsx":
            names = [node.module] if node.module != "dsx" else [f"dsx.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "dsx"]
        found |= {n.split(".")[1] for n in names if "." in n}
    return found


def test_every_import_runs_down_the_layers():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        part = path.relative_to(ROOT).parts[0].removesuffix(".py")
        if part not in ALLOWED:
            continue
        for target in imports(path) - {part} - ALLOWED[part]:
            bad.append(f"{path.relative_to(ROOT.parent)} ({part}) imports dsx.{target}")
    assert not bad, "\n".join(bad)


def test_the_walk_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from dsx.parallel.comm import SPECS\n    import dsx.quant\n"
                      "from dsx import export\n")
    assert imports(module) == {"parallel", "quant", "export"}
