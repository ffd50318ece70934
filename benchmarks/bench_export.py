"""CPU latency of models exported with ``dsx.export`` and run in onnxruntime (fp32) vs the same models in eager PyTorch.

Models: a BERT-sized Hugging Face ``BertModel`` built from its config (hidden 768, 12 heads, batch 8, seq 128; no
download) and the built-in TinyResNet. Every export is verified in onnxruntime; its errors are in the table.
The int8 columns export ``dsx.quantize(model, "int8")`` (``MatMulInteger`` with per-token activation scales) and
compare it in onnxruntime with the fp32 file and, by cosine similarity, with the PyTorch int8 model.
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
from dsx.quant import quantize


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


def session_ms(path: Path, inputs: dict[str, torch.Tensor], iters: int) -> tuple[float, torch.Tensor]:
    """onnxruntime milliseconds for the file at ``path`` and its first output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return measure_ms(lambda: session.run(None, feeds), warmup=3, iters=iters), torch.from_numpy(
        session.run(None, feeds)[0])


def bench(name: str, layers: int, iters: int, tmp: Path) -> list:
    """One table row: eager, onnxruntime fp32 and int8 milliseconds, the fp32 export's verified errors and the int8
    file's cosine similarity to the PyTorch int8 model."""
    model, inputs = build(name, layers)
    fp32 = export(model, inputs, tmp / f"{name}.onnx")
    int8_model = quantize(model, "int8", progress=False)
    int8 = export(int8_model, inputs, tmp / f"{name}_int8.onnx")
    # Timed one after the other, not interleaved: onnxruntime's worker threads spin after each run
    # and would slow an eager run that follows.
    with torch.inference_mode():
        eager = measure_ms(lambda: model(**inputs), warmup=3, iters=iters)
        ref = int8_model(**inputs)
        ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    ort_fp32, _ = session_ms(fp32.path, inputs, iters)
    ort_int8, out = session_ms(int8.path, inputs, iters)
    cosine = torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0).item()
    label = f"bert-{layers}L" if name == "bert" else name
    return [label, eager, ort_fp32, f"{eager / ort_fp32:.2f}x", fp32.max_rel, ort_int8, f"{ort_fp32 / ort_int8:.2f}x",
            f"{cosine:.5f}"]


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
    print(text_table(["model", "eager ms", "ort fp32 ms", "ort vs eager", "fp32 max rel err", "ort int8 ms",
                      "int8 vs fp32 in ort", "int8 cosine vs torch int8"], rows))


if __name__ == "__main__":
    main()
