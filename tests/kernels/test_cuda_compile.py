"""Every dsx Triton kernel compiles to PTX and cubin for CUDA targets on this CPU machine (Triton's own ptxas, no GPU):
every autotune config for sm90 (H100 / H200) with Triton 3.6 (the lent GPU machine's, which .ci/run installs beside
this environment's), and the first config of each for sm80 and sm90 with both Tritons; none slower than 45 s.

Compiling runs in a subprocess without ``TRITON_INTERPRET`` (under the interpreter there is nothing to compile).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

SCRIPT = Path(__file__).with_name("cuda_compile.py")
MAX_SECONDS = 45.0
"""A config taking longer stalls the autotuner (a BLOCK 65536 row kernel at num_warps=1 took 70-121 s); 45 s leaves
room for a loaded CI machine (the int4 GEMM configs took 20-32 s on 2 busy cores)."""

pytestmark = pytest.mark.skipif("nvidia" not in triton.backends.backends,
                                reason="this Triton build has no NVIDIA backend")


TRITON_36 = Path(os.environ.get("DSX_TRITON36", SCRIPT.parents[2] / ".triton36"))
"""Triton 3.6, the lent GPU machine's, which ``.ci/run`` installs there with ``pip install --no-deps --target``:
every kernel must compile with it as well as with the Triton this environment has."""


def compile_all(arch: int, tmp_path: Path, *flags: str, triton_dir: Path | None = None) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    if triton_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(triton_dir), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, str(SCRIPT), str(arch), *flags], capture_output=True, text=True,
                         timeout=900, env=env, cwd=SCRIPT.parents[2])
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines()]


def check(rows: list[dict]) -> None:
    assert rows
    failed = [f"{r['kernel']} [{r['config']}]: {r['error']}" for r in rows if "error" in r]
    assert not failed, "\n".join(failed)
    slow = [f"{r['kernel']} [{r['config']}]: {r['seconds']} s" for r in rows if r["seconds"] > MAX_SECONDS]
    assert not slow, "\n".join(slow)


NEEDS_36 = pytest.mark.skipif(not (TRITON_36 / "triton").is_dir(),
                              reason=f"no Triton 3.6 at {TRITON_36} (.ci/run installs it)")
TRITONS = [pytest.param(None, id="this-triton"), pytest.param(TRITON_36, id="triton-3.6", marks=NEEDS_36)]


@NEEDS_36
def test_every_config_compiles_for_sm90_with_the_gpu_machines_triton(tmp_path):
    rows = compile_all(90, tmp_path, "--all-configs", triton_dir=TRITON_36)
    assert all(r["triton"].startswith("3.6.") for r in rows)
    check(rows)
    kernels = {r["kernel"] for r in rows}
    assert {"_int8_scaled_mm_fwd", "_int4_weight_only_mm_fwd", "_softmax_fwd", "_quantize_per_token_fwd"} <= kernels
    # the int8 GEMM's tiles of 64+ rows run Hopper's warp-group MMA
    assert any(r["wgmma"] for r in rows if r["kernel"] == "_int8_scaled_mm_fwd")


def test_first_configs_compile_for_sm90_with_this_triton(tmp_path):
    rows = compile_all(90, tmp_path)
    check(rows)
    assert {"_int8_scaled_mm_fwd", "_int4_weight_only_mm_fwd", "_softmax_fwd"} <= {r["kernel"] for r in rows}


@pytest.mark.parametrize("triton_dir", TRITONS)
def test_first_configs_compile_for_sm80(triton_dir, tmp_path):
    rows = compile_all(80, tmp_path, triton_dir=triton_dir)
    assert triton_dir is None or all(r["triton"].startswith("3.6.") for r in rows)
    check(rows)
