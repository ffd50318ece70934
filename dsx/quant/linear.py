"""Quantized linear layers: plain int8 / float8 weight tensors plus fp32 scales, one class per format.

They hold only buffers (state_dict, safetensors and ``dsx.load`` friendly) and run the dsx kernel ops; each can
split itself over a device mesh for tensor parallelism (``QuantLinear.shard``).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from dsx.core.modules import is_hf_conv1d
from dsx.kernels.int8_fbgemm import (int8_dynamic_mm_fbgemm, int8_scaled_mm_fbgemm,
                                     int8_w7_row_fbgemm, use_fbgemm)
from dsx.kernels.int8_linear_cpu import compiles_to_op, fbgemm_pack, int8_linear_cpu
from dsx.kernels.int8_mm import int8_scaled_mm, int8_weight_only_mm
from dsx.kernels.quantize_fp8 import quantize_fp8_rowwise
from dsx.kernels.quantize_per_token import quantize_per_token
from dsx.quant.tensor_split import TensorSplit, split_buffers

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


def is_linear(module: nn.Module) -> bool:
    """Whether dsx can quantize ``module`` as a linear layer (``nn.Linear`` or Hugging Face ``Conv1D``)."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``[out, in]`` weight and the bias of a linear layer, detached."""
    w = module.weight.detach()
    w = w.t() if is_hf_conv1d(module) else w
    return w, None if module.bias is None else module.bias.detach()


def quantize_weight(w: torch.Tensor, dtype: torch.dtype = torch.int8,
                    qmax: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization to int8 (rounded, +-127) or float8 e4m3 (+-448).

    Args:
        w: the float weight ``[N, K]``.
        dtype: ``torch.int8`` or ``torch.float8_e4m3fn``.
        qmax: the largest code (None: the dtype's, 127 or 448; 63 gives 7-bit int8 codes).

    Returns:
        ``(q [N, K] dtype, scale [N] fp32)`` with ``w ~= q * scale[:, None]``.
    """
    w = w.float()
    qmax = qmax or (127.0 if dtype == torch.int8 else FP8_MAX)
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / qmax
    q = w / scale[:, None]
    return (torch.round(q) if dtype == torch.int8 else q).clamp_(-qmax, qmax).to(dtype), scale


def eager_cpu(x: torch.Tensor) -> bool:
    """A plain CPU tensor outside any tracing: the ops' CPU kernels may be called directly (no dispatch cost).

    Under torch.compile / torch.export the dsx ops stay in the graph, where inductor and the ONNX exporter see them.
    """
    return type(x) is torch.Tensor and x.device.type == "cpu" and not torch.compiler.is_compiling()


class QuantLinear(nn.Module, abc.ABC):
    """Base: ``weight`` ([out, in], int8 or e4m3), ``weight_scale`` ([out] fp32), ``bias`` (float or None)."""

    format: ClassVar[str] = ""
    description: ClassVar[str] = ""
    weight_dtype: ClassVar[torch.dtype] = torch.int8
    SHARD_DIMS: ClassVar[dict[str, dict[str, int | None]]] = {
        "colwise": {"weight": 0, "weight_scale": 0, "bias": 0},
        "rowwise": {"weight": 1, "weight_scale": None, "bias": None},
    }
    """Per tensor-parallel style, the dim of each buffer split across the ranks (None: every rank holds all of it).
    colwise splits the output features; rowwise the input features, the bias added once after the all-reduce."""
    split: TensorSplit | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype: torch.dtype = torch.float32,
                 device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=self.weight_dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def quantize_weight(cls, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, per-channel scale)`` of the float weight ``[out, in]`` in this class's ``weight_dtype``."""
        return quantize_weight(w, cls.weight_dtype)

    @classmethod
    def from_float(cls, module: nn.Module, **kwargs: Any) -> QuantLinear:
        """Quantize an ``nn.Linear`` (or Hugging Face ``Conv1D``)."""
        w, b = linear_weight(module)
        q = cls(w.shape[1], w.shape[0], b is not None, dtype=w.dtype, device=w.device, **kwargs)
        q.weight, q.weight_scale = cls.quantize_weight(w)
        if b is not None:
            q.bias = b.clone()
        return q

    def dequantize(self) -> torch.Tensor:
        """The float weight ``[out, in]`` these integers stand for."""
        return self.weight.float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        where = "" if self.split is None else f", {self.split.style} shard of {self.split.mesh.size()} ranks"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format} ({self.description}){where}")

    def shard(self, style: str, mesh: DeviceMesh, chunks: int = 1) -> QuantLinear:
        """Split this layer over the ranks of a 1-D ``mesh`` for tensor parallelism, in place: it keeps this rank's
        slices of its buffers (``SHARD_DIMS``) and ``in_features`` / ``out_features`` become the local ones. A
        collective: every rank calls it, and the mesh rank 0's buffers are the ones split.

        ``colwise``: the input is the whole activation, the output this rank's slice of the features. ``rowwise``:
        the input is this rank's slice of the features; the ranks' partial products are summed (all-reduce), then
        the bias added; per-token activation scales use the whole row's maximum (all-reduced), so the integers are
        those of the unsharded layer. ``state_dict`` gives DTensors of the whole shapes.

        Args:
            style: ``"colwise"`` or ``"rowwise"``.
            mesh: a 1-D DeviceMesh.
            chunks: how many projections a fused layer stacks (colwise: each rank gets its slice of each).

        Returns:
            This layer.

        Raises:
            ValueError: an unknown style, a mesh that is not 1-D, a split dim not divisible by the ranks, or a layer
                already split.
            TypeError: ``mesh`` is not a DeviceMesh, or the layer holds a buffer ``SHARD_DIMS`` has no dim for.
        """
        if self.split is not None:
            raise ValueError(f"{type(self).__name__} is already a {self.split.style} shard")
        self.split = split_buffers(self, style, mesh, self.SHARD_DIMS.get(style, {}), chunks)
        self.out_features, self.in_features = self.weight.shape
        return self

    @property
    def partial(self) -> bool:
        """Whether this is a rowwise shard, whose ``quantized_forward`` is one rank's share of the sum (no bias)."""
        return self.split is not None and self.split.style == "rowwise"

    def output_bias(self) -> torch.Tensor | None:
        """The bias ``quantized_forward`` adds: none on a rowwise shard (added once after the all-reduce)."""
        return None if self.partial else self.bias

    def output_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of ``quantized_forward``'s GEMM output: ``x``'s, fp32 for a rowwise shard's partial sums."""
        return torch.float32 if self.partial else x.dtype

    def input_absmax(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The per-row ``max |x|`` a dynamic activation quantizer must use instead of the rows' own: on a rowwise
        shard the whole row's (all-reduced over the ranks), else None."""
        if not self.partial:
            return None
        return self.split.all_reduce(rows.abs().amax(-1, keepdim=True).float(), "max")

    @abc.abstractmethod
    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``x`` with its quantized arithmetic (no autograd wrapping); on a rowwise shard
        this rank's partial product, without the bias."""

    def sharded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``quantized_forward``, on a rowwise shard summed over the ranks with the bias then added."""
        out = self.quantized_forward(x)
        if not self.partial:
            return out
        out = self.split.all_reduce(out.float(), "sum")
        return (out if self.bias is None else out + self.bias.float()).to(x.dtype)

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The straight-through gradient of the input: the output's gradient through the dequantized weight (summed
        over the ranks on a colwise shard, whose ranks each see a slice of the output)."""
        out = grad @ self.dequantize().to(grad.dtype)
        if self.split is not None and self.split.style == "colwise":
            self.split.all_reduce(out, "sum")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _StraightThrough.apply(x, self)
        return self.sharded_forward(x)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        """Device moves reach every buffer; dtype casts (``.half()``, ``.to(torch.bfloat16)``) reach only the bias:
        the quantized weight and its float32 scales keep their dtypes (and their precision)."""
        kept = {n: b for n, b in self._buffers.items() if b is not None and n != "bias"}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input's last dim is {x.shape[-1]}, expected {self.in_features}")
        return x.reshape(-1, self.in_features)


class _StraightThrough(torch.autograd.Function):
    """The quantized forward with a float backward: ``d out / d x`` uses the dequantized weight, so layers before a
    frozen quantized linear still train."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
        ctx.module = module
        return module.sharded_forward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.module.input_grad(grad), None


class Int8Linear(QuantLinear):
    """``int8``: activations quantized per token at run time, int8 x int8 -> int32, scales applied in the epilogue."""

    format = "int8"
    description = "dynamic per-token int8 activations, per-channel int8 weights"
    SEVEN_BIT: ClassVar[bool] = False
    """The weight's codes fit 7 bits (``int8_w7``): fbgemm takes 8-bit activation codes in one pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A single row (decode) of an unsharded layer on the CPU runs on the fbgemm pack in the fewest Python steps:
        decode runs dozens of layers per token, each after its weight's bytes have evicted the interpreter's from
        cache, so each step costs microseconds. Everything else runs ``QuantLinear``'s path."""
        b = self._buffers
        if (type(x) is torch.Tensor and x.is_cpu and x.dim() and x.numel() == x.shape[-1] == self.in_features
                and self.split is None and not (x.requires_grad and torch.is_grad_enabled())
                and not torch.compiler.is_compiling() and b["weight"].is_cpu and use_fbgemm(x, 1)):
            return self.fbgemm_row(x, fbgemm_pack(b["weight"], b["weight_scale"]), b["bias"])
        return super().forward(x)

    def fbgemm_row(self, x: torch.Tensor, packed: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """The product of one row ``x`` (any leading dims of size 1) on the fbgemm pack, as ``x.dtype``."""
        return int8_dynamic_mm_fbgemm(x.reshape(1, -1), packed, bias).reshape(*x.shape[:-1], self.out_features)

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """On the CPU ``int8_linear_cpu`` (called directly in eager mode, as ``dsx::int8_linear_cpu`` in a compiled
        graph where inductor's int8 product would be slower); elsewhere, and for export, the dsx ops."""
        rows = self._rows(x)
        absmax, bias, dtype = self.input_absmax(rows), self.output_bias(), self.output_dtype(x)
        if eager_cpu(rows):
            out = int8_linear_cpu(rows, self.weight, self.weight_scale, bias, absmax, dtype, self.SEVEN_BIT)
        elif compiles_to_op(rows):
            out = torch.ops.dsx.int8_linear_cpu(rows, self.weight, self.weight_scale, bias, absmax, dtype,
                                                self.SEVEN_BIT)
        else:
            xq, xs = quantize_per_token(rows, absmax)
            out = int8_scaled_mm(xq, xs, self.weight.t(), self.weight_scale, bias, dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8W7Linear(Int8Linear):
    """``int8_w7``: ``int8`` with 7-bit weight codes (+-63). Every int8 kernel runs it unchanged; on CPUs without
    VNNI, fbgemm then takes the 8-bit activation codes in one pass instead of two (``int8_w7_mm_fbgemm``)."""

    format = "int8_w7"
    description = "dynamic per-token int8 activations, per-channel 7-bit weights"
    WEIGHT_QMAX = 63.0
    SEVEN_BIT = True

    @classmethod
    def quantize_weight(cls, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_weight(w, torch.int8, cls.WEIGHT_QMAX)

    def fbgemm_row(self, x: torch.Tensor, packed: Any, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_w7_row_fbgemm(x, packed, bias)


class Int8StaticLinear(QuantLinear):
    """``int8_static``: one calibrated activation scale (``input_scale``), optionally SmoothQuant ``smooth`` factors.

    ``smooth`` (shape ``[in]``) multiplies the activation before quantization; the weight columns were
    divided by it, so ``x @ W^T`` is unchanged while activation outliers move into the weights.
    """

    format = "int8_static"
    description = "calibrated per-tensor int8 activations, per-channel int8 weights"
    SHARD_DIMS = {style: {**dims, "input_scale": None, "smooth": 0 if style == "rowwise" else None}
                  for style, dims in QuantLinear.SHARD_DIMS.items()}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype: torch.dtype = torch.float32,
                 device: Any = None, smooth: bool = False) -> None:
        super().__init__(in_features, out_features, bias, dtype=dtype, device=device)
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device) if smooth else None)

    @classmethod
    def from_float(cls, module: nn.Module, *, input_amax: float = 127.0,
                   smooth: torch.Tensor | None = None) -> Int8StaticLinear:
        """Quantize with the calibrated activation range ``input_amax`` (of ``x * smooth`` when smoothing)."""
        w, b = linear_weight(module)
        q = cls(w.shape[1], w.shape[0], b is not None, dtype=w.dtype, device=w.device, smooth=smooth is not None)
        if smooth is not None:
            q.smooth = smooth.detach().float().to(w.device)
            w = w.float() / q.smooth
        q.weight, q.weight_scale = cls.quantize_weight(w)
        q.input_scale = torch.tensor(max(float(input_amax), 1e-12) / 127.0, device=w.device)
        if b is not None:
            q.bias = b.clone()
        return q

    def dequantize(self) -> torch.Tensor:
        w = super().dequantize()
        return w if self.smooth is None else w * self.smooth

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows(x)
        if self.smooth is not None:
            rows = rows * self.smooth
        xq = torch.mul(rows, 1.0 / self.input_scale).round_().clamp_(-127, 127).to(torch.int8)
        xs = self.input_scale.expand(rows.shape[0], 1)
        bias, dtype = self.output_bias(), self.output_dtype(x)
        if eager_cpu(rows) and use_fbgemm(rows, rows.shape[0]):
            out = int8_scaled_mm_fbgemm(xq, xs, fbgemm_pack(self.weight, self.weight_scale), bias, dtype)
        else:
            out = int8_scaled_mm(xq, xs, self.weight.t(), self.weight_scale, bias, dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8WeightOnlyLinear(QuantLinear):
    """``int8_weight_only`` (W8A16): the int8 weight is dequantized inside the matmul; activations stay float."""

    format = "int8_weight_only"
    description = "per-channel int8 weights, float activations"

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._rows(x)
        return int8_weight_only_mm(x, self.weight, self.weight_scale, self.output_bias())


class FP8Linear(QuantLinear):
    """``fp8``: row-wise dynamic e4m3 activations x per-channel e4m3 weights through ``torch._scaled_mm``."""

    format = "fp8"
    description = "row-wise dynamic float8_e4m3fn activations, per-channel float8_e4m3fn weights"
    weight_dtype = FP8

    def shard(self, style: str, mesh: DeviceMesh, chunks: int = 1) -> QuantLinear:
        """``QuantLinear.shard``, refusing a split whose local sizes ``torch._scaled_mm`` cannot take.

        Raises:
            ValueError: a local in / out feature count that is not a multiple of 16 (and ``shard``'s own errors).
        """
        if isinstance(mesh, DeviceMesh) and mesh.ndim == 1 and style in self.SHARD_DIMS:
            world = mesh.size()
            local = (self.in_features // world, self.out_features) if style == "rowwise" else \
                (self.in_features, self.out_features // world)
            if any(d % 16 for d in local):
                raise ValueError(f"mesh: a {style} split over {world} ranks leaves this fp8 layer {local[1]} x "
                                 f"{local[0]} per rank; torch._scaled_mm needs multiples of 16")
        return super().shard(style, mesh, chunks)

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows(x)
        absmax, bias = self.input_absmax(rows), self.output_bias()
        xq, xs = quantize_fp8_rowwise(rows, absmax)
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale.view(1, -1),
                               **scaled_mm_options(x.device, bias))
        if bias is not None and not x.is_cuda:
            out = out + bias.to(out.dtype)
        return out.to(self.output_dtype(x)).reshape(*x.shape[:-1], self.out_features)


def scaled_mm_options(device: torch.device, bias: torch.Tensor | None) -> dict[str, Any]:
    """``torch._scaled_mm``'s keyword arguments for row-wise fp8 on ``device``: on CUDA a bf16 output (what row-wise
    scaling produces) with the bias added inside the GEMM's epilogue and fast accumulation (cuBLAS's fp8 mode that
    skips the periodic fp32 promotion, as torchao's inference default); on the CPU an fp32 output, the bias added
    after."""
    if device.type != "cuda":
        return {"out_dtype": torch.float32}
    return {"out_dtype": torch.bfloat16, "use_fast_accum": True,
            "bias": None if bias is None else bias.to(torch.bfloat16)}


class FP8WeightOnlyLinear(QuantLinear):
    """``fp8_weight_only``: per-channel e4m3 weights dequantized to the activation dtype for the matmul."""

    format = "fp8_weight_only"
    description = "per-channel float8_e4m3fn weights, float activations"
    weight_dtype = FP8

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._rows(x)
        w = self.weight.to(x.dtype) * self.weight_scale[:, None].to(x.dtype)
        bias = self.output_bias()
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def fp8_supported(device: torch.device) -> str | None:
    """None when ``torch._scaled_mm`` runs row-wise e4m3 on ``device``, else the reason it does not."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"fp8 needs a CUDA GPU with compute capability >= 8.9 (this one has {major}.{minor})"
    a = torch.ones(16, 16, device=device).to(FP8)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                         out_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    except (RuntimeError, NotImplementedError) as e:
        return f"torch._scaled_mm does not run row-wise float8 on {device.type} in torch {torch.__version__}: {e}"
    return None
