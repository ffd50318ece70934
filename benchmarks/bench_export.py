"""CPU latency of models exported with ``dsx.export`` and run in onnxruntime (fp32) vs the same models in eager PyTorch.

Models: a BERT-sized Hugging Face ``BertModel`` built from its config (hidden 768, 12 heads, batch 8, seq 128; no
download) and the built-in TinyResNet. Every export is verified in onnxruntime; its errors are in the table.
The issue's int8 rows (onnxruntime int8 from ``dsx.quantize`` vs onnxruntime fp32) wait for the quantization
transform, which does not exist yet; they are not faked here.
Run: python benchmarks/bench_export.py [--models bert,resnet] [--layers 4] [--iters 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dsx.core.table import text_table
from dsx.core.timing import measure_ms
from dsx.export import export
from dsx.models import TinyResNet, randomize_batchnorm


def build(name: str, layers: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """An eval-mode model and its inputs by keyword (the names the ONNX graph inputs get)."""
    torch.manual_seed(0)
    if name == "bert":
        import transformers as T

        cfg = T.BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072)
        ids = torch.randint(0, cfg.vocab_size, (8, 128))
        return T.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "resnet":
        return randomize_batchnorm(TinyResNet(width=64)).eval(), {"x": torch.randn(16, 3, 64, 64)}
    raise SystemExit(f"unknown model {name!r}: choose from bert, resnet")


def bench(name: str, layers: int, iters: int, tmp: Path) -> list:
    """One table row: eager vs onnxruntime fp32 milliseconds and the export's verified errors."""
    import onnxruntime as ort

    model, inputs = build(name, layers)
    result = export(model, inputs, tmp / f"{name}.onnx")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    # Timed one after the other, not interleaved: onnxruntime's worker threads spin after each run
    # and would slow an eager run that follows.
    eager = measure_ms(lambda: model(**inputs), warmup=3, iters=iters)
    onnx = measure_ms(lambda: session.run(None, feeds), warmup=3, iters=iters)
    label = f"bert-{layers}L" if name == "bert" else name
    return [label, eager, onnx, f"{eager / onnx:.2f}x", result.max_abs, result.max_rel]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bert,resnet")
    p.add_argument("--layers", type=int, default=4, help="BERT encoder layers")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(name, a.layers, a.iters, Path(tmp))
                for name in tqdm(a.models.split(","), desc="bench_export", disable=a.no_progress)]
    import onnxruntime as ort

    print(f"device: cpu  torch {torch.__version__}  onnxruntime {ort.__version__}  threads {torch.get_num_threads()}")
    print(text_table(["model", "eager ms", "onnxruntime fp32 ms", "ort vs eager", "max abs err", "max rel err"],
                     rows))


if __name__ == "__main__":
    main()
