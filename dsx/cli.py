"""The ``dsx`` command line: ``dsx demo`` (built-in models, no download) and ``dsx passes``.

Argument parsing only; the work lives in the library modules.
"""

from __future__ import annotations

import argparse
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsx", description="Make PyTorch modules smaller and faster.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="optimize two built-in models and print a comparison table")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    demo.add_argument("--iters", type=int, default=50, help="timed runs per configuration (median reported)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_parser("passes", help="list the graph passes in run order")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.iters < 1:
            raise SystemExit("dsx demo: --iters must be >= 1")
        from dsx.demo import main as demo

        demo(device=args.device, iters=args.iters, progress=not args.no_progress)
    elif args.command == "passes":
        from dsx.graph.pass_manager import available_passes

        for p in available_passes().values():
            print(f"{p.name:24s} {'kernel' if p.kernel else 'graph':6s} {p.doc}")
    return 0
