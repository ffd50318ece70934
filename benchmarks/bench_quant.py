"""CPU int8 latency: dsx.quantize vs torch.ao quantize_dynamic, onnxruntime and torchao int8, fp32 eager / compile.
Models: a BERT-base MLP block on 4096 tokens and a 4-layer HF BertModel (8 x 128). Run: bench_quant.py [--small]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import dsx
from dsx.core.table import text_table
from dsx.core.timing import compare_ms, cpu_name, measure_ms
from dsx.export import export

Run = Callable[[], Any]


@dataclass
class Case:
    """One model with its keyword inputs (the names the ONNX graph inputs get) and a folder for ONNX files."""

    label: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    tmp: Path

    def run(self, module: Callable[..., Any]) -> Run:
        return lambda: module(**self.inputs)

    @cached_property
    def dsx_int8(self) -> nn.Module:
        return dsx.quantize(self.model, "int8", progress=False)


def build(name: str, small: bool, tmp: Path) -> Case:
    """The MLP block (``input`` [tokens, hidden]) or a Hugging Face BertModel (``input_ids``, ``attention_mask``)."""
    torch.manual_seed(0)
    hidden, inter = (64, 256) if small else (768, 3072)
    if name == "mlp":
        tokens = 64 if small else 4096
        mlp = nn.Sequential(nn.Linear(hidden, inter), nn.GELU(), nn.Linear(inter, hidden)).eval()
        return Case(f"MLP {hidden}-{inter}-{hidden}, {tokens} tokens", mlp, {"input": torch.randn(tokens, hidden)}, tmp)
    if name == "bert":
        import transformers as T

        layers, batch, seq = (2, 2, 16) if small else (4, 8, 128)
        cfg = T.BertConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=2 if small else 12,
                           num_hidden_layers=layers, attn_implementation="sdpa")
        ids = torch.randint(0, cfg.vocab_size, (batch, seq))
        return Case(f"HF BertModel (sdpa), {layers} layers, d={hidden}, {batch}x{seq}", T.BertModel(cfg).eval(),
                    {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp)
    raise SystemExit(f"unknown model {name!r}: choose from mlp, bert")


def fp32_eager(case: Case) -> tuple[Run, str]:
    return case.run(case.model), ""


def fp32_compile(case: Case) -> tuple[Run, str]:
    return case.run(torch.compile(case.model)), "inductor"


def torch_dynamic(case: Case) -> tuple[Run, str]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated")
        q = torch.ao.quantization.quantize_dynamic(case.model, {nn.Linear}, dtype=torch.qint8)
    return case.run(q), f"{torch.backends.quantized.engine} engine"


def ort_dynamic(case: Case) -> tuple[Run, str]:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = export(case.model, case.inputs, case.tmp / "fp32.onnx").path
    # per_channel costs nothing here and is closer to fp32; reduce_range=True with it ran 2.8x slower, QUInt8 1.5x.
    quantize_dynamic(fp32, case.tmp / "int8.onnx", per_channel=True, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(case.tmp / "int8.onnx"), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: case.inputs[i.name].numpy() for i in session.get_inputs()}
    return lambda: session.run(None, feeds), "per-channel QInt8 weights; timed alone"


def torchao_model(case: Case) -> nn.Module:
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it warns that its CUDA-only extensions do not load
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = copy.deepcopy(case.model)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def torchao_eager(case: Case) -> tuple[Run, str]:
    return case.run(torchao_model(case)), ""


def torchao_compile(case: Case) -> tuple[Run, str]:
    return case.run(torch.compile(torchao_model(case))), "inductor"


def dsx_int8(case: Case) -> tuple[Run, str]:
    return case.run(case.dsx_int8), ""


def dsx_int8_compile(case: Case) -> tuple[Run, str]:
    return case.run(torch.compile(case.dsx_int8, backend="dsx")), ""


def dsx_int8_w7(case: Case) -> tuple[Run, str]:
    return case.run(dsx.quantize(case.model, "int8_w7", progress=False)), ""


def dsx_int8_weight_only(case: Case) -> tuple[Run, str]:
    return case.run(dsx.quantize(case.model, "int8_weight_only", progress=False)), ""


# name -> (timing group, builder). Each group is timed interleaved (compare_ms) apart from the others: inductor's
# OpenMP threads and onnxruntime's worker threads spin after each run and would slow whatever ran next.
ROWS: dict[str, tuple[str, Callable[[Case], tuple[Run, str]]]] = {
    "fp32 eager": ("eager", fp32_eager),
    "fp32 torch.compile": ("compiled", fp32_compile),
    "torch.ao quantize_dynamic int8": ("eager", torch_dynamic),
    "onnxruntime quantize_dynamic int8": ("onnxruntime", ort_dynamic),
    "torchao int8 dynamic": ("eager", torchao_eager),
    "torchao int8 dynamic + torch.compile": ("compiled", torchao_compile),
    "dsx int8": ("eager", dsx_int8),
    'dsx int8 + torch.compile(backend="dsx")': ("compiled", dsx_int8_compile),
    "dsx int8_w7 (7-bit weights)": ("eager", dsx_int8_w7),
    "dsx int8_weight_only": ("eager", dsx_int8_weight_only),
}


def main_output(out: Any) -> torch.Tensor:
    """The output compared: the tensor itself, or the first of a tuple, list or Hugging Face ModelOutput."""
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out[0])


def failure(e: Exception) -> str:
    if isinstance(e, ModuleNotFoundError):
        return f"{e.name} not installed"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:160]


def bench(case: Case, iters: int, bar: tqdm) -> list[list[Any]]:
    """One table: per row ms, speedup over fp32 eager and cosine similarity of the main output to fp32 eager's."""
    with torch.inference_mode():
        ref = main_output(case.model(**case.inputs)).double().flatten()
    runs: dict[str, Run] = {}
    notes: dict[str, str] = {}
    cosine: dict[str, float] = {}
    ms: dict[str, float] = {}
    for group in ("eager", "compiled", "onnxruntime"):
        names = [n for n, (g, _) in ROWS.items() if g == group]
        for name in names:
            bar.set_postfix_str(f"{case.label.split(',')[0]}: {name}")
            try:
                runs[name], notes[name] = ROWS[name][1](case)
                with torch.inference_mode():  # the first call also compiles
                    out = main_output(runs[name]()).double().flatten()
                cosine[name] = torch.nn.functional.cosine_similarity(out, ref, dim=0).item()
            except Exception as e:  # one failing peer must not stop the others
                runs.pop(name, None)
                notes[name] = failure(e)
            bar.update()
        timed = {n: runs[n] for n in names if n in runs}
        try:
            if group == "onnxruntime":
                ms.update({n: measure_ms(fn, warmup=3, iters=iters) for n, fn in timed.items()})
            elif timed:
                ms.update(compare_ms(timed, warmup=3, iters=iters))
        except Exception as e:
            notes.update({n: f"timing: {failure(e)}" for n in timed})
    base = ms.get("fp32 eager")
    return [[name, ms.get(name, "-"), f"{base / ms[name]:.2f}x" if base and name in ms else "-",
             f"{cosine[name]:.6f}" if name in cosine else "-", notes[name]] for name in ROWS]


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,bert")
    p.add_argument("--small", action="store_true", help="tiny shapes (the test suite's smoke run)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    names = a.models.split(",")
    tables = []
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(names) * len(ROWS), desc="bench_quant",
                                                   disable=a.no_progress) as bar:
        for name in names:
            (Path(tmp) / name).mkdir()
            case = build(name, a.small, Path(tmp) / name)
            tables.append((case.label, bench(case, a.iters, bar)))
    print(f"device: cpu ({cpu_name()}, {os.cpu_count()} cores)  torch {torch.__version__}  "
          f"onnxruntime {package_version('onnxruntime')}  torchao {package_version('torchao')}  "
          f"threads {torch.get_num_threads()}  date {datetime.date.today()}  iters {a.iters}")
    for label, rows in tables:
        print(f"\n{label}, fp32 inputs, torch.inference_mode()")
        print(text_table(["method", "ms", "vs fp32 eager", "cosine vs fp32 eager", "notes"], rows))
    print("\nms: median; eager rows and compiled rows are each timed interleaved (compare_ms), apart from each other; "
          "onnxruntime alone (measure_ms),\nsince inductor's and onnxruntime's threads spin after each run.")


if __name__ == "__main__":
    main()
