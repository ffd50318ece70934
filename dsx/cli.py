"""The ``dsx`` command line: ``optimize``, ``export``, ``bench`` and ``summary`` a model; ``demo``; ``passes``.

Argument parsing and reporting only; the work lives in the library (``dsx.export`` is imported when a command needs it).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
from safetensors import safe_open
from tqdm.auto import tqdm

import dsx
from dsx.cli_models import add_model_arguments, call_factory, model_and_inputs
from dsx.core.inputs import normalize_inputs, run_model, tensor_leaves
from dsx.core.serialize import META, WEIGHTS, read_meta
from dsx.core.summary import COLUMNS, history_cells, history_row, size_text
from dsx.core.table import text_table
from dsx.core.timing import compare_ms
from dsx.core.transform import compare_outputs
from dsx.demo import main as demo
from dsx.graph.pass_manager import available_passes

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                      "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
                      "BOOL": "bool"}


def _positive(text: str) -> int:
    n = int(text) if text.lstrip("-").isdigit() else 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _float_type(ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: the text as a float for which ``ok`` holds, else an error saying ``expected``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")  # fails every bound
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_fraction = _float_type(lambda v: 0 <= v < 1, "a fraction in [0, 1)")
_non_negative = _float_type(lambda v: 0 <= v < float("inf"), "a finite number >= 0")
_positive_float = _float_type(lambda v: 0 < v < float("inf"), "a positive number")


def _bar(args: argparse.Namespace, desc: str, steps: int) -> tqdm:
    """A progress bar on stderr over a command's steps; it clears itself when done or on an error."""
    return tqdm(total=steps, desc=f"dsx {desc}", leave=False, file=sys.stderr,
                disable=getattr(args, "no_progress", False))


def _step(bar: tqdm, label: str) -> None:
    bar.set_postfix_str(label)
    bar.update()


def _optimize(args: argparse.Namespace) -> None:
    with _bar(args, "optimize", 2 + bool(args.out) + bool(args.export)) as bar:
        model, inputs = model_and_inputs(args)
        _step(bar, "loaded")
        if args.recipe:
            opt = dsx.from_recipe(args.recipe)(model, inputs)
        else:
            passes = args.passes if args.passes in (None, "all") else args.passes.split(",")
            calibration = call_factory(args.calibration, what="--calibration") if args.calibration else None
            formats = args.formats.split(",") if args.formats else None
            opt = dsx.optimize(model, inputs, max_error=args.max_error, metric=args.metric, formats=formats,
                               budget_s=args.budget_s, compile=not args.no_compile, passes=passes, prune=args.prune,
                               structured=args.structured, sparsity=args.sparsify, quantize=args.quantize,
                               calibration=calibration, progress=not getattr(args, "no_progress", False))
        _step(bar, "optimized")
        saved = dsx.save(opt, args.out) if args.out else None
        if saved:
            _step(bar, "saved")
        result = None
        if args.export:
            from dsx.export import export

            dynamic = args.dynamic_batch or any(e["config"].get("dynamic_batch") for e in dsx.history(opt))
            result = export(opt, inputs, args.export, dynamic_shapes="batch" if dynamic else None)
            _step(bar, "exported")
    print(dsx.summary(opt))
    if not args.recipe:
        print()
        print(dsx.report(opt))
    if saved:
        print(f"saved: {saved}")
    if result:
        print(f"exported: {result}")


def _export(args: argparse.Namespace) -> None:
    from dsx.export import export

    with _bar(args, "export", 2) as bar:
        model, inputs = model_and_inputs(args)
        _step(bar, "loaded")
        result = export(model, inputs, args.out, dynamic_shapes="batch" if args.dynamic_batch else None,
                        opset=args.opset, verify=not args.no_verify)
        _step(bar, "exported")
    print(result)


def _ort_feeds(session: Any, model: Any, inputs: tuple[tuple, dict]) -> dict[str, Any]:
    """Example tensors keyed by the ONNX graph's input names: by argument name, else in signature order."""
    args, kwargs = inputs
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    names = [i.name for i in session.get_inputs()]
    if all(isinstance(bound.get(n), torch.Tensor) for n in names):
        return {n: bound[n].numpy() for n in names}
    leaves = [x for x in pytree.tree_leaves(list(bound.values())) if isinstance(x, torch.Tensor)]
    if len(leaves) != len(names):
        raise ValueError(f"bench: cannot match the ONNX graph's inputs {names} to the {len(leaves)} example tensors")
    return {n: x.numpy() for n, x in zip(names, leaves)}


def _bench(args: argparse.Namespace) -> None:
    from dsx.export import export

    plt = _pyplot() if args.plot else None
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError('dsx bench needs onnxruntime: pip install "dsx[onnx]"') from None
    with _bar(args, "bench", 5) as bar:
        model, example = model_and_inputs(args)
        a, kw = inputs = normalize_inputs(example)
        reference = run_model(model, inputs)
        _step(bar, "loaded")
        opt = dsx.optimize(model, example, progress=False)
        _step(bar, "optimized")
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export(model, example, Path(tmp) / "model.onnx").path
            session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        feeds = _ort_feeds(session, model, inputs)
        _step(bar, "exported to onnx")
        torch._dynamo.reset()
        compiled = torch.compile(model)
        run: dict[str, Callable[[], Any]] = {
            "eager": lambda: model(*a, **kw), "dsx.optimize": lambda: opt(*a, **kw),
            "torch.compile": lambda: compiled(*a, **kw),
            "onnxruntime fp32": lambda: [torch.from_numpy(x) for x in session.run(None, feeds)]}
        ref_tensors = tensor_leaves(reference)
        with torch.no_grad():
            err = {k: compare_outputs(reference, run[k]())["max_abs"] for k in ("dsx.optimize", "torch.compile")}
        err["onnxruntime fp32"] = compare_outputs(ref_tensors, run["onnxruntime fp32"]())["max_abs"]
        _step(bar, "compiled")
        # Runtimes with spinning worker threads (inductor's OpenMP, onnxruntime's pool) are timed apart from
        # the eager-style ones, which they would slow down (see dsx/demo.py).
        ms = {**compare_ms({k: run[k] for k in ("eager",)}, warmup=3, iters=args.iters),
              **compare_ms({k: run[k] for k in ("dsx.optimize", "torch.compile", "onnxruntime fp32")}, warmup=3,
                           iters=args.iters)}
        _step(bar, "timed")
    rows = [[k, ms[k], f"{ms['eager'] / ms[k]:.2f}x", err.get(k, "-")] for k in run]
    print(f"device: cpu  torch {torch.__version__}  onnxruntime {ort.__version__}  threads {torch.get_num_threads()}")
    print(text_table(["runtime", "ms", "vs eager", "max abs err"], rows))
    if plt:
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.barh(list(run)[::-1], [ms[k] for k in run][::-1])
        ax.set_xlabel("ms per call (median)")
        ax.set_title(args.model)
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def _summary(args: argparse.Namespace) -> None:
    path = Path(args.file)
    if not path.is_dir():
        raise FileNotFoundError(f"summary: {path} is not a directory written by dsx.save ({WEIGHTS} + {META})")
    meta = read_meta(path)
    by_dtype: dict[str, list[int]] = {}
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            if (code := sl.get_dtype()) not in SAFETENSORS_DTYPES:
                raise ValueError(f"summary: tensor {key!r} in {path / WEIGHTS} has dtype {code}, which dsx does not "
                                 f"know")
            dtype, numel = SAFETENSORS_DTYPES[code], torch.Size(sl.get_shape()).numel()
            c = by_dtype.setdefault(dtype, [0, 0, 0])
            c[:] = [c[0] + 1, c[1] + numel, c[2] + numel * getattr(torch, dtype).itemsize]
    tensors, elements, size = (sum(c[i] for c in by_dtype.values()) for i in range(3))
    mode = "training" if meta["training"] else "eval"
    totals = [("file", path), ("model", f"{meta['origin']} ({mode} mode)"),
              ("tensors", f"{tensors:,} (parameters and persistent buffers)"), ("elements", f"{elements:,}"),
              ("size", size_text(size))]
    print("\n".join(f"{k + ':':<10}{v}" for k, v in totals), end="\n\n")
    dtypes = sorted(by_dtype.items(), key=lambda kv: -kv[1][2])
    cells = [[k, n, f"{e:,}", size_text(b)] for k, (n, e, b) in dtypes]
    print(text_table(["dtype", "tensors", "elements", "size"], cells))
    print()
    if not meta["history"]:
        print("no dsx transforms applied")
        return
    print(text_table(COLUMNS, history_cells([history_row(e) for e in meta["history"]])))


def _demo(args: argparse.Namespace) -> None:
    demo(device=args.device, budget_s=args.budget_s, progress=not getattr(args, "no_progress", False))


def _passes(args: argparse.Namespace) -> None:
    for p in available_passes().values():
        print(f"{p.name:24s} {'kernel' if p.kernel else 'graph':6s} {p.doc}")


def _parser() -> argparse.ArgumentParser:
    # Global flags are accepted before or after the command; SUPPRESS keeps a subcommand from resetting them.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the full traceback")
    common.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS, help="hide progress bars")
    p = argparse.ArgumentParser(prog="dsx", description="Make PyTorch modules smaller and faster.", parents=[common])
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, fn: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help, description=help, parents=[common])
        cmd.set_defaults(run=fn)
        return cmd

    opt = command("optimize", _optimize, "search the fastest verified plan for a model (or run a recipe), print its "
                                         "summary and the plans tried, save / export it")
    add_model_arguments(opt)
    how = opt.add_mutually_exclusive_group()
    how.add_argument("--passes", metavar="all|NAME,NAME",
                     help="graph passes of the compiled plans (default: the device's set)")
    how.add_argument("--recipe", metavar="RECIPE.yaml", help="run the transforms of a recipe file instead")
    opt.add_argument("--max-error", type=_non_negative, metavar="E",
                     help="allow lossy plans whose output error (by --metric) is at most E (default: lossless)")
    opt.add_argument("--metric", choices=["max_rel", "cosine"], default="max_rel",
                     help="max relative output error, or 1 - the smallest row cosine similarity")
    opt.add_argument("--formats", metavar="NAME,NAME", help="only these formats (int8, int8+bf16, bf16, 2:4, ...)")
    opt.add_argument("--budget-s", type=_positive_float, metavar="S", help="stop trying new plans after S seconds")
    opt.add_argument("--no-compile", action="store_true", help="do not try torch.compile(backend='dsx') plans")
    opt.add_argument("--dynamic-batch", action="store_true", help="with --export: keep dim 0 dynamic in the file")
    opt.add_argument("--prune", type=_fraction, metavar="AMOUNT", help="prune this fraction of the weights first")
    opt.add_argument("--structured", action="store_true", help="with --prune: remove whole channels, neurons, heads")
    opt.add_argument("--sparsify", metavar="2:4", help="2:4 sparsity on the eligible linear layers")
    opt.add_argument("--quantize", metavar="FORMAT", help="a dsx.quantize format: int8, int8_static, fp8, ...")
    opt.add_argument("--calibration", metavar="package.module:factory",
                     help="a factory returning calibration batches (for --quantize int8_static)")
    opt.add_argument("--out", metavar="DIR", help="save the result with dsx.save (safetensors + dsx.json)")
    opt.add_argument("--export", metavar="FILE", help="export the result with dsx.export (.onnx, .pt2, .engine / .ts)")

    exp = command("export", _export, "export a model to .onnx, .pt2 or .engine / .ts (TensorRT) and verify it")
    add_model_arguments(exp)
    exp.add_argument("out", metavar="OUT", help="the file to write; its suffix picks the format")
    exp.add_argument("--dynamic-batch", action="store_true", help="keep dim 0 of every input dynamic")
    exp.add_argument("--opset", type=_positive, help="ONNX opset version")
    exp.add_argument("--no-verify", action="store_true", help="skip running the exported file on the inputs")

    bench = command("bench", _bench, "time eager, torch.compile, dsx.optimize and onnxruntime on CPU")
    add_model_arguments(bench)
    bench.add_argument("--iters", type=_positive, default=20, help="timed runs per runtime (median reported)")
    bench.add_argument("--plot", metavar="PNG", help="also draw the timings as a bar chart (needs matplotlib)")

    summ = command("summary", _summary, "show the history and weights of a model saved by dsx.save")
    summ.add_argument("file", metavar="FILE", help="the directory dsx.save wrote")

    demo = command("demo", _demo, "run dsx.optimize's search on built-in models and print what it picked")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    demo.add_argument("--budget-s", type=_positive_float, default=4.0, help="seconds each search may spend")
    command("passes", _passes, "list the graph passes in run order")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dsx`` command; returns the exit code (0 ok, 1 error; usage errors exit with 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "optimize" and args.recipe:
        given = [f"--{k.replace('_', '-')}" for k in ("prune", "structured", "sparsify", "quantize", "calibration",
                                                       "max_error", "formats", "budget_s", "no_compile")
                 if getattr(args, k) not in (None, False)]
        if given:
            parser.error(f"optimize: {', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --recipe; "
                         "set it in the recipe's steps")
    if args.command == "optimize" and args.structured and args.prune is None:
        parser.error("optimize: --structured needs --prune AMOUNT")
    try:
        args.run(args)
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"dsx: error: {lines[0]}{' ...' if len(lines) > 1 else ''} (--debug shows the traceback)",
              file=sys.stderr)
        return 1
    return 0
