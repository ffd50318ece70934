"""Smoke runs of the benchmark scripts on tiny settings: they must run and print their table (no timing asserted)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.parametrize("script,args,row", [
    ("bench_kernels.py", ["--rows", "64", "--cols", "96", "--dtype", "fp32", "--iters", "2"], "softmax_scale_mask"),
    ("bench_optimize.py", ["--models", "resnet", "--iters", "1", "--no-progress"], "fold_batch_norm=9"),
    ("bench_export.py", ["--models", "resnet", "--iters", "1", "--no-progress"], "int8 vs fp32 in ort"),
    ("bench_prune.py", ["--small", "--iters", "1", "--no-progress"], "pruned"),
    ("bench_parallel.py", ["--small", "--no-progress"], "topk:0.01"),
    ("bench_generate.py", ["--small", "--tokens", "4", "--repeats", "1", "--prefill", "8", "--context", "64", "--rows",
                           "fp32 eager,g128 (bf16),KV cache", "--no-progress"], "dsx int8_w7 + int8 KV cache"),
    ("bench_auto.py", ["--small", "--models", "bert", "--iters", "1", "--budget-s", "5", "--no-progress"],
     "dsx.optimize (max_error=0.01, cosine)"),
])
def test_benchmark_prints_its_table(script, args, row):
    res = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert row in res.stdout and "device:" in res.stdout


def test_bench_quant_times_every_installed_row():
    """bench_quant on the tiny MLP only (the tiny BERT's compiles would double the time): every row gets a time,
    except one whose package is not installed (torchao is not in the test extras)."""
    args = ["--small", "--models", "mlp", "--iters", "1", "--no-progress"]
    res = subprocess.run([sys.executable, str(BENCH / "bench_quant.py"), *args], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "device:" in res.stdout and 'dsx int8 + torch.compile(backend="dsx")' in res.stdout
    failed = [line for line in res.stdout.splitlines() if "  -  " in line and "not installed" not in line]
    assert not failed, "\n".join(failed)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for minutes")
def test_gpu_check_says_there_is_no_cuda_device_and_exits_0():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = time.monotonic()
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0 and "no CUDA device" in res.stdout, res.stdout + res.stderr
    assert time.monotonic() - start < 10
