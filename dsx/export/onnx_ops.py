"""ONNX translations of the dsx kernel ops (``torch.ops.dsx.*``) into standard ONNX operators, for torch.onnx.

With them an optimized model exports without custom-domain nodes and with the numerics of the ops' PyTorch path.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import torch

DEFAULT_OPSET = 20
GELU_OPSET = 20


def translation_table(opset: int = DEFAULT_OPSET) -> dict[Any, Callable]:
    """``{op overload: onnxscript function}`` for the dsx ops and the QDQ ops, to pass as ``torch.onnx.export``'s
    ``custom_translation_table`` when exporting at ONNX ``opset`` (GELU is the ``Gelu`` operator from opset 20 on,
    spelled out with ``Erf`` / ``Tanh`` below it)."""
    from onnxscript import ir
    from onnxscript import opset18 as op
    from onnxscript import opset20

    def const(value: float, dtype: Any) -> Any:
        return op.Constant(value=ir.tensor(value, dtype=dtype))

    def compute_type(*dtypes: Any) -> Any:
        """The dtype PyTorch computes in for these inputs: fp32 for half types, fp64 if any input is fp64."""
        return ir.DataType.DOUBLE if ir.DataType.DOUBLE in dtypes else ir.DataType.FLOAT

    def cast(x: Any, src: Any, dst: Any) -> Any:
        """``x`` (of dtype ``src``) as ``dst``. Intermediate values carry no dtype while tracing, so every
        dtype here comes from the function's inputs."""
        return x if src == dst else op.Cast(x, to=dst)

    def add(a: Any, b: Any) -> Any:
        """``(a + b).to(a.dtype)``, computed in the dtype PyTorch promotes the two to."""
        if a.dtype == b.dtype:
            return op.Add(a, b)
        dtype = compute_type(a.dtype, b.dtype)
        return cast(op.Add(cast(a, a.dtype, dtype), cast(b, b.dtype, dtype)), dtype, a.dtype)

    def gelu(h: Any, dtype: Any, approximate: str) -> Any:
        if opset >= GELU_OPSET:
            return opset20.Gelu(h, approximate=approximate)
        if approximate == "tanh":
            cube = op.Mul(h, op.Mul(h, h))
            inner = op.Mul(op.Add(h, op.Mul(cube, const(0.044715, dtype))), const(math.sqrt(2 / math.pi), dtype))
            return op.Mul(op.Mul(h, const(0.5, dtype)), op.Add(op.Tanh(inner), const(1.0, dtype)))
        erf = op.Erf(op.Mul(h, const(math.sqrt(0.5), dtype)))
        return op.Mul(op.Mul(h, const(0.5, dtype)), op.Add(erf, const(1.0, dtype)))

    def activation(h: Any, dtype: Any, act: str) -> Any:
        """``act(h)`` for ``h`` of dtype ``dtype``, as ``dsx.kernels.bias_act.activation`` defines it."""
        if act == "relu":
            return op.Relu(h)
        if act == "silu":
            return op.Mul(h, op.Sigmoid(h))
        return gelu(h, dtype, "tanh" if act == "gelu_tanh" else "none")

    def rms(s: Any, dtype: Any, weight: Any, eps: float) -> Any:
        """Llama RMSNorm of ``s`` (dtype ``dtype``): fp32 statistics, normalized value cast to ``dtype`` before
        ``* weight``, product cast back to ``dtype``."""
        ct = compute_type(dtype)
        h = cast(s, dtype, ct)
        mean_sq = op.ReduceMean(op.Mul(h, h), op.Constant(value_ints=[-1]), keepdims=1)
        normed = cast(op.Mul(h, op.Reciprocal(op.Sqrt(op.Add(mean_sq, const(eps, ct))))), ct, dtype)
        if weight is None:
            return normed
        if weight.dtype == dtype:
            return op.Mul(normed, weight)
        wt = compute_type(dtype, weight.dtype)
        return cast(op.Mul(cast(normed, dtype, wt), cast(weight, weight.dtype, wt)), wt, dtype)

    def add_layer_norm(x, residual, weight=None, bias=None, eps: float = 1e-5):
        s = add(x, residual)
        if weight is None:
            weight = op.Expand(const(1.0, x.dtype), op.Shape(x, start=-1))
        else:
            weight = cast(weight, weight.dtype, x.dtype)
        bias = None if bias is None else cast(bias, bias.dtype, x.dtype)
        normed, _, _ = op.LayerNormalization(s, weight, bias, axis=-1, epsilon=eps, stash_type=1)
        return normed, s

    def add_rms_norm(x, residual, weight=None, eps: float = 1e-6):
        s = add(x, residual)
        return rms(s, x.dtype, weight, eps), s

    def rms_norm(x, weight=None, eps: float = 1e-6):
        return rms(x, x.dtype, weight, eps)

    def bias_act(x, bias=None, act: str = "gelu"):
        ct = compute_type(x.dtype)
        h = cast(x, x.dtype, ct)
        if bias is not None:
            h = op.Add(h, cast(bias, bias.dtype, ct))
        return cast(activation(h, ct, act), ct, x.dtype)

    def gated_act(gate, up, act: str = "silu"):
        ct = compute_type(gate.dtype)
        y = op.Mul(activation(cast(gate, gate.dtype, ct), ct, act), cast(up, up.dtype, ct))
        return cast(y, ct, gate.dtype)

    def scaled_masked_softmax(x, mask=None, scale: float = 1.0):
        ct = compute_type(x.dtype)
        s = cast(x, x.dtype, ct)
        if scale != 1.0:
            s = op.Mul(s, const(scale, ct))
        if mask is not None and mask.dtype == ir.DataType.BOOL:
            s = op.Where(mask, s, const(-math.inf, ct))
        elif mask is not None:
            s = op.Add(s, cast(mask, mask.dtype, ct))
        return cast(op.Softmax(s, axis=-1), ct, x.dtype)

    def row_absmax(h: Any) -> Any:
        """``max(|h|, 1e-12)`` over the last dim of the fp32 ``h``, kept as a dim of 1."""
        amax = op.ReduceMax(op.Abs(h), op.Constant(value_ints=[-1]), keepdims=1)
        return op.Max(amax, const(1e-12, ir.DataType.FLOAT))

    def quantize_per_token(x):
        """Symmetric per-row int8, as ``dsx.kernels.quantize_per_token``: ``round(x * (1 / amax) * 127)``."""
        h = cast(x, x.dtype, ir.DataType.FLOAT)
        amax = row_absmax(h)
        q = op.Round(op.Mul(h, op.Mul(op.Reciprocal(amax), const(127.0, ir.DataType.FLOAT))))
        return op.Cast(q, to=ir.DataType.INT8), op.Div(amax, const(127.0, ir.DataType.FLOAT))

    def to_uint8(t):
        """int8 ``t`` as ``t + 128`` in uint8 (the same integers with a zero point of 128)."""
        shifted = op.Add(op.Cast(t, to=ir.DataType.INT16), op.Constant(value=ir.tensor(128, ir.DataType.INT16)))
        return op.Cast(shifted, to=ir.DataType.UINT8)

    def int8_scaled_mm(a, a_scale, b, b_scale, bias=None, out_dtype: Any = ir.DataType.FLOAT):
        """``MatMulInteger`` (exact int32) and the fp32 epilogue ``* a_scale * b_scale + bias``. Both operands go in
        as uint8 with zero point 128 (the same integers): onnxruntime's uint8 x int8 kernels sum pairs of products in
        int16 on CPUs without VNNI, which saturates; uint8 x uint8 is exact on every CPU (the weight's shift is
        constant-folded when the session loads)."""
        zero = op.Constant(value=ir.tensor(128, ir.DataType.UINT8))
        y = op.Mul(op.Mul(op.Cast(op.MatMulInteger(to_uint8(a), to_uint8(b), zero, zero), to=ir.DataType.FLOAT),
                          a_scale), b_scale)
        if bias is not None:
            y = op.Add(y, cast(bias, bias.dtype, ir.DataType.FLOAT))
        return cast(y, ir.DataType.FLOAT, out_dtype)

    def int8_weight_only_mm(x, w, w_scale, bias=None):
        """A per-channel ``DequantizeLinear`` of the int8 weight (a QDQ weight) feeding ``MatMul``."""
        ct = compute_type(x.dtype)
        weight = op.Transpose(op.DequantizeLinear(w, w_scale, axis=0), perm=[1, 0])
        y = op.MatMul(cast(x, x.dtype, ct), cast(weight, ir.DataType.FLOAT, ct))
        if bias is not None:
            y = op.Add(y, cast(bias, bias.dtype, ct))
        return cast(y, ct, x.dtype)

    def int4_weight_only_mm(x, qweight, scale, zero, group_size: int, bias=None, packed=None, scales_zeros=None):
        """The packed nibbles unpacked (``BitwiseAnd`` / ``BitShift``), ``(q - zero) * scale`` per group in fp32
        (zeros may be fractional, which ``DequantizeLinear`` cannot express), then ``MatMul``; the CPU-packed copy
        is not exported."""
        ct = compute_type(x.dtype)
        n, half = qweight.shape
        low = op.BitwiseAnd(qweight, op.Constant(value=ir.tensor(15, ir.DataType.UINT8)))
        high = op.BitShift(qweight, op.Constant(value=ir.tensor(4, ir.DataType.UINT8)), direction="RIGHT")
        codes = op.Concat(op.Unsqueeze(low, [-1]), op.Unsqueeze(high, [-1]), axis=-1)
        grouped = op.Reshape(op.Cast(codes, to=ir.DataType.FLOAT), op.Constant(value_ints=[n, -1, group_size]))
        w = op.Mul(op.Sub(grouped, op.Unsqueeze(zero, [-1])), op.Unsqueeze(scale, [-1]))
        weight = op.Transpose(op.Reshape(w, op.Constant(value_ints=[n, 2 * half])), perm=[1, 0])
        y = op.MatMul(cast(x, x.dtype, ct), cast(weight, ir.DataType.FLOAT, ct))
        if bias is not None:
            y = op.Add(y, cast(bias, bias.dtype, ct))
        return cast(y, ct, x.dtype)

    def quantize_fp8_rowwise(x):
        """Row-wise e4m3 as ``dsx.kernels.quantize_fp8_rowwise``: a per-row ``QuantizeLinear`` (opset 19 float8,
        saturating, round to nearest even) by ``max(|row|, 1e-12) / 448``. 2-D inputs only (``FP8QDQLinear`` passes
        rows): onnxruntime has no float8 ``Reshape`` to restore other shapes."""
        if len(x.shape) != 2:
            raise ValueError(f"quantize_fp8_rowwise: ONNX export takes 2-D rows, got rank {len(x.shape)}")
        h = cast(x, x.dtype, ir.DataType.FLOAT)
        amax = row_absmax(h)
        scale = op.Div(amax, const(448.0, ir.DataType.FLOAT))
        flat = op.Reshape(scale, op.Constant(value_ints=[-1]))
        zero = op.Cast(op.Mul(flat, const(0.0, ir.DataType.FLOAT)), to=ir.DataType.FLOAT8E4M3FN)  # one per row
        return op.QuantizeLinear(h, flat, zero, axis=0), scale

    def int8_zero(value: int = 0) -> Any:
        return op.Constant(value=ir.tensor(value, dtype=ir.DataType.INT8))

    def quantize_per_tensor(x, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: Any):
        """``QuantizeLinear`` (saturating to int8's [-128, 127]; no ``Clip`` to ``quant_min``, which would keep
        onnxruntime from fusing the QDQ pair: only values past the calibrated range can differ, by one step)."""
        return op.QuantizeLinear(x, const(scale, ir.DataType.FLOAT), int8_zero(zero_point))

    def dequantize_per_tensor(q, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: Any,
                              out_dtype: Any = None):
        return op.DequantizeLinear(q, const(scale, ir.DataType.FLOAT), int8_zero(zero_point))

    def dequantize_per_channel(q, scales, zero_points, axis: int, quant_min: int, quant_max: int, dtype: Any,
                               out_dtype: Any = None):
        zeros = op.Cast(zero_points, to=ir.DataType.INT8)
        return op.DequantizeLinear(q, op.Cast(scales, to=ir.DataType.FLOAT), zeros, axis=axis)

    importlib.import_module("torch.ao.quantization.fx._decomposed")  # registers the quantized_decomposed ops

    qd = torch.ops.quantized_decomposed
    ops = torch.ops.dsx
    return {
        qd.quantize_per_tensor.default: quantize_per_tensor,
        qd.dequantize_per_tensor.default: dequantize_per_tensor,
        qd.dequantize_per_channel.default: dequantize_per_channel,
        ops.quantize_per_token.default: quantize_per_token,
        ops.int8_scaled_mm.default: int8_scaled_mm,
        ops.int8_weight_only_mm.default: int8_weight_only_mm,
        ops.int4_weight_only_mm.default: int4_weight_only_mm,
        ops.quantize_fp8_rowwise.default: quantize_fp8_rowwise,
        ops.add_layer_norm.default: add_layer_norm,
        ops.add_rms_norm.default: add_rms_norm,
        ops.rms_norm.default: rms_norm,
        ops.bias_act.default: bias_act,
        ops.gated_act.default: gated_act,
        ops.scaled_masked_softmax.default: scaled_masked_softmax,
    }
