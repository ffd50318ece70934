"""The registry of formats: one frozen dataclass per format, named by the string users pass to ``dsx.quantize``.

Each class says what a layer becomes, the hardware it needs and is fast on, and its default tolerance; which
layers, calibration and the error budget belong to ``dsx.Quantize``. ``dsx.quantize``, the CLI and ``dsx.optimize``'s
search read this registry, so adding a format is one class here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from dsx.core.hardware import cpu_flags, has_int8_dot
from dsx.kernels.int4_mm import GROUP_SIZES
from dsx.kernels.int8_fbgemm import fbgemm_available
from dsx.quant.int4 import ALGORITHMS as INT4_ALGORITHMS
from dsx.quant.int4 import Int4WeightOnlyLinear
from dsx.quant.linear import (FP8Linear, FP8WeightOnlyLinear, Int8Linear, Int8StaticLinear, Int8W7Linear,
                              Int8WeightOnlyLinear, QuantLinear, fp8_supported, linear_weight)

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def int8_compiles_fast(device: torch.device) -> bool:
    """Compiled graphs run ``dsx::int8_scaled_mm`` as ``torch._int_mm`` on a CPU with int8 dot-product instructions
    and as an fp32 matmul of the codes without them (no faster than float; the dynamic formats call fbgemm there
    instead, through ``dsx::int8_linear_cpu``)."""
    return device.type != "cpu" or has_int8_dot()


def native_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` computes ``dtype`` (bf16 / fp16) matmuls natively, so casting to it is a speed-up."""
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        want = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}[dtype]
        return any(f in cpu_flags() for f in want)
    return False


@dataclass(frozen=True)
class QuantConfig:
    """Base of the formats. ``embeddings`` (None, 4 or 8) also quantizes ``nn.Embedding`` tables; ``dtype``
    (None, ``"bfloat16"`` or ``"float16"``) runs the layers left float in that dtype (a mixed plan: int8 linears
    with bf16 attention, say), with inputs cast to it and float outputs cast back.

    Class attributes are the registration: ``format`` (the string name), ``tolerance`` (the max relative output
    error the format may add by default), ``linear`` (the quantized module class), ``qat`` / ``calibrated`` /
    ``quantizes_linears``, ``compiled_int8_mm`` (compiled layers run ``torch._int_mm`` on the CPU); ``unsupported``
    says where it cannot run, ``fast_on`` where ``dsx.optimize`` tries it.
    """

    format: ClassVar[str] = ""
    tolerance: ClassVar[float] = 0.1
    linear: ClassVar[type[QuantLinear] | None] = None
    qat: ClassVar[bool] = False
    calibrated: ClassVar[bool] = False
    quantizes_linears: ClassVar[bool] = True
    compiled_int8_mm: ClassVar[bool] = False
    registry: ClassVar[dict[str, type[QuantConfig]]] = {}

    embeddings: int | None = None
    dtype: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("format"):
            QuantConfig.registry[cls.format] = cls

    def __post_init__(self) -> None:
        if self.embeddings not in (None, 4, 8):
            raise ValueError(f"embeddings: expected None, 4 or 8 (bits of the embedding tables), "
                             f"got {self.embeddings!r}")
        if self.dtype is not None and self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype: expected None or one of {sorted(COMPUTE_DTYPES)} (the dtype of the layers left "
                             f"float), got {self.dtype!r}")

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """``dtype`` as a torch dtype (None: the model's own)."""
        return None if self.dtype is None else COMPUTE_DTYPES[self.dtype]

    def unsupported(self, device: torch.device) -> str | None:
        """Why this format cannot run on ``device``; None when it can."""
        return None

    def fast_on(self, device: torch.device) -> bool:
        """Whether the format has a fast path on ``device`` (``dsx.optimize`` tries only those)."""
        dtype = self.compute_dtype
        return dtype is None or native_dtype(device, dtype)

    def compiles_fast(self, device: torch.device) -> bool:
        """Whether the format is fast under ``torch.compile`` too (``dsx.optimize`` tries the compiled variant)."""
        return self.fast_on(device) and (not self.compiled_int8_mm or int8_compiles_fast(device))

    def rejects(self, module: nn.Module) -> str | None:
        """Why this format leaves the linear ``module`` float; None when it quantizes it."""
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            return "out_proj of nn.MultiheadAttention, whose forward reads the float weight directly"
        if not linear_weight(module)[0].is_floating_point():
            return "weight is not floating point"
        return None

    def needs_calibration(self) -> bool:
        """Whether building this format's layers needs calibration batches (activation ranges or a solver)."""
        return self.calibrated

    def solve(self, model: nn.Module, linears: dict[str, nn.Module], batches: list[Any],
              progress: bool = True) -> dict[str, Any] | None:
        """A data-driven solver's per-layer result (passed to ``build`` as ``solved``); None: the format calibrates
        activation ranges instead. The model must end unchanged."""
        return None

    def build(self, module: nn.Module, *, input_amax: float | None = None, smooth: torch.Tensor | None = None,
              replay: bool = False, solved: Any = None) -> nn.Module:
        """The quantized replacement of the linear ``module`` (``input_amax`` / ``smooth``: calibrated formats;
        ``solved``: this layer's entry of ``solve``)."""
        assert self.linear is not None, f"{type(self).__name__} quantizes no linears"
        return self.linear.from_float(module)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"format": ..., **fields}`` (what ``resolve_config`` reads back)."""
        return {"format": self.format, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Int8Dynamic(QuantConfig):
    """``"int8"``: dynamic per-token int8 activations x per-channel symmetric int8 weights, int32 accumulate."""

    format = "int8"
    linear = Int8Linear
    qat = True


@dataclass(frozen=True)
class Int8W7(QuantConfig):
    """``"int8_w7"``: ``"int8"`` with 7-bit weight codes (+-63), for x86 CPUs without VNNI (AVX2): fbgemm runs it in
    one pass where exact 8-bit weights take two, about twice as fast at batch sizes; the activations keep their 8-bit
    per-token codes (torch.ao's ``reduce_range`` drops a bit of the activations instead, per tensor)."""

    format = "int8_w7"
    linear = Int8W7Linear

    def fast_on(self, device: torch.device) -> bool:
        return device.type == "cpu" and not has_int8_dot() and fbgemm_available() and super().fast_on(device)


@dataclass(frozen=True)
class Int8WeightOnly(QuantConfig):
    """``"int8_weight_only"`` (W8A16): per-channel int8 weights dequantized inside the matmul."""

    format = "int8_weight_only"
    tolerance = 0.05
    linear = Int8WeightOnlyLinear
    qat = True


@dataclass(frozen=True)
class FP8Dynamic(QuantConfig):
    """``"fp8"``: row-wise dynamic float8 e4m3 activations x per-channel e4m3 weights via ``torch._scaled_mm``."""

    format = "fp8"
    tolerance = 0.15
    linear = FP8Linear

    def unsupported(self, device: torch.device) -> str | None:
        return fp8_supported(device)

    def fast_on(self, device: torch.device) -> bool:
        return device.type == "cuda" and super().fast_on(device)

    def rejects(self, module: nn.Module) -> str | None:
        w = linear_weight(module)[0]
        if any(d % 16 for d in w.shape):  # wherever it is quantized: the layer may move to a GPU later
            return "fp8 needs in and out features divisible by 16 (torch._scaled_mm on CUDA)"
        return super().rejects(module)


@dataclass(frozen=True)
class FP8WeightOnly(QuantConfig):
    """``"fp8_weight_only"``: per-channel e4m3 weights, dequantized to the activation dtype for the matmul."""

    format = "fp8_weight_only"
    linear = FP8WeightOnlyLinear

    def fast_on(self, device: torch.device) -> bool:
        return device.type == "cuda" and super().fast_on(device)


@dataclass(frozen=True)
class Int8Static(QuantConfig):
    """``"int8_static"``: per-tensor int8 activation scales calibrated on data, per-channel int8 weights.

    ``observer`` picks the activation range (minmax, percentile, mse, entropy); ``percentile`` is the
    percentile observer's setting; ``smoothquant`` (alpha in [0, 1]) migrates activation outliers into weights.
    """

    format = "int8_static"
    tolerance = 0.15
    linear = Int8StaticLinear
    qat = True
    calibrated = True
    compiled_int8_mm = True

    observer: str = "minmax"
    percentile: float = 99.99
    smoothquant: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        from dsx.quant.observers import OBSERVERS

        if self.observer not in OBSERVERS:
            raise ValueError(f"observer: expected one of {sorted(OBSERVERS)}, got {self.observer!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile: expected a value in (0, 100], got {self.percentile!r}")
        if self.smoothquant is not None and not 0.0 <= self.smoothquant <= 1.0:
            raise ValueError(f"smoothquant: expected alpha in [0, 1] or None, got {self.smoothquant!r}")

    def build(self, module: nn.Module, *, input_amax: float | None = None, smooth: torch.Tensor | None = None,
              replay: bool = False, solved: Any = None) -> nn.Module:
        if replay:  # the calibrated scales come from the saved weights
            k = linear_weight(module)[0].shape[1]
            return Int8StaticLinear.from_float(module, smooth=torch.ones(k) if self.smoothquant is not None else None)
        assert input_amax is not None, "int8_static needs the calibrated input range"
        return Int8StaticLinear.from_float(module, input_amax=input_amax, smooth=smooth)


@dataclass(frozen=True)
class Int4WeightOnly(QuantConfig):
    """``"int4_weight_only"`` (W4A16): asymmetric 4-bit weights with a scale and zero per ``group_size`` input
    columns, float activations.

    ``algorithm``: ``"hqq"`` (default, no data: half-quadratic optimization of each group's scale and zero),
    ``"gptq"`` (needs ``calibration``: per-layer Hessians, error propagation, block by block; ``damp`` is the
    Hessian damping as a fraction of its mean diagonal, ``act_order`` quantizes columns by decreasing Hessian
    diagonal) or ``"rtn"`` (round to nearest, the baseline). Linears whose ``in_features`` ``group_size`` does not
    divide stay float.
    """

    format = "int4_weight_only"
    tolerance = 0.3
    linear = Int4WeightOnlyLinear

    group_size: int = 128
    algorithm: str = "hqq"
    act_order: bool = False
    damp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if type(self.group_size) is not int or self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size: expected one of {list(GROUP_SIZES)}, got {self.group_size!r}")
        if self.algorithm not in INT4_ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {list(INT4_ALGORITHMS)}, got {self.algorithm!r}")
        if not isinstance(self.act_order, bool):
            raise TypeError(f"act_order: expected True or False, got {self.act_order!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise ValueError(f"damp: expected a fraction in (0, 1), got {self.damp!r}")

    def needs_calibration(self) -> bool:
        return self.algorithm == "gptq"

    def fast_on(self, device: torch.device) -> bool:
        # CPU: fast for decode (up to 16 rows per matmul), slower than fp32 for the batches a search measures
        return device.type == "cuda" and super().fast_on(device)

    def rejects(self, module: nn.Module) -> str | None:
        k = linear_weight(module)[0].shape[1]
        if k % self.group_size:
            return f"in_features={k} is not a multiple of group_size={self.group_size}"
        return super().rejects(module)

    def solve(self, model: nn.Module, linears: dict[str, nn.Module], batches: list[Any],
              progress: bool = True) -> dict[str, Any] | None:
        if self.algorithm != "gptq":
            return None
        from dsx.quant.gptq import gptq_sequential

        return gptq_sequential(model, batches, linears, group_size=self.group_size, damp=self.damp,
                               act_order=self.act_order, progress=progress)

    def build(self, module: nn.Module, *, input_amax: float | None = None, smooth: torch.Tensor | None = None,
              replay: bool = False, solved: Any = None) -> nn.Module:
        if solved is not None:
            return Int4WeightOnlyLinear.from_quantized(module, *solved, group_size=self.group_size)
        # replay: the weights come from the file, so the cheapest data-free build has the right structure
        algorithm = "rtn" if replay or self.algorithm == "gptq" else self.algorithm
        return Int4WeightOnlyLinear.from_float(module, group_size=self.group_size, algorithm=algorithm)


@dataclass(frozen=True)
class _Bitsandbytes(QuantConfig):
    """Base of the bitsandbytes formats: ``nn.Linear`` only, swapped for bitsandbytes' own module (fast on CUDA)."""

    def fast_on(self, device: torch.device) -> bool:
        return device.type == "cuda" and super().fast_on(device)

    def rejects(self, module: nn.Module) -> str | None:
        if not isinstance(module, nn.Linear):
            return f"bitsandbytes takes nn.Linear only, not {type(module).__name__}"
        return super().rejects(module)

    def build(self, module: nn.Module, *, input_amax: float | None = None, smooth: torch.Tensor | None = None,
              replay: bool = False, solved: Any = None) -> nn.Module:
        from dsx.quant.bnb import to_bnb

        return to_bnb(module, self.format)


@dataclass(frozen=True)
class NF4(_Bitsandbytes):
    """``"nf4"``: 4-bit NormalFloat weights through bitsandbytes ``Linear4bit``."""

    format = "nf4"
    tolerance = 0.3


@dataclass(frozen=True)
class LLMInt8(_Bitsandbytes):
    """``"llm_int8"``: bitsandbytes ``Linear8bitLt`` (int8 weights; input columns above 6.0 run in fp16)."""

    format = "llm_int8"


@dataclass(frozen=True)
class EmbeddingOnly(QuantConfig):
    """``"embedding_int8"`` / ``"embedding_int4"``: only the ``nn.Embedding`` tables, linears stay float."""

    format = "embedding"
    quantizes_linears = False

    embeddings: int | None = 8

    def fast_on(self, device: torch.device) -> bool:
        return False  # smaller, not faster

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embeddings is None:
            raise ValueError("embeddings: an embedding-only config needs 4 or 8 bits, not None")


@dataclass(frozen=True)
class _Cast(QuantConfig):
    """Base of the whole-model float formats: no integer layers, every float layer runs in ``dtype`` (inputs cast
    in, float outputs cast back); fast where the hardware computes that dtype natively."""

    quantizes_linears = False
    tolerance = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        default = type(self).__dataclass_fields__["dtype"].default
        if self.dtype != default:
            raise ValueError(f"dtype: the {self.format} format computes in {default!r}, got {self.dtype!r}")


@dataclass(frozen=True)
class BFloat16(_Cast):
    """``"bf16"``: the whole model in bfloat16 (native on AVX512-BF16 / AMX CPUs and CUDA sm80+)."""

    format = "bf16"

    dtype: str | None = "bfloat16"


@dataclass(frozen=True)
class Float16(_Cast):
    """``"fp16"``: the whole model in float16 (native on CUDA and AVX512-FP16 / AMX-FP16 CPUs)."""

    format = "fp16"

    dtype: str | None = "float16"


ALIASES: dict[str, QuantConfig] = {"embedding_int8": EmbeddingOnly(8), "embedding_int4": EmbeddingOnly(4)}


def valid_formats() -> list[str]:
    """Every string ``dsx.quantize`` accepts as ``config``."""
    return sorted([f for f in QuantConfig.registry if f != EmbeddingOnly.format] + list(ALIASES))


def resolve_config(config: str | QuantConfig | dict[str, Any]) -> QuantConfig:
    """A config object from a format string, a config object or its ``to_dict()`` form."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        if config in ALIASES:
            return ALIASES[config]
        if config not in QuantConfig.registry or config == EmbeddingOnly.format:
            raise ValueError(f"config: unknown quantization format {config!r}; valid formats are {valid_formats()}")
        return QuantConfig.registry[config]()
    if isinstance(config, dict):
        fields = dict(config)
        fmt = fields.pop("format", None)
        if fmt not in QuantConfig.registry:
            raise ValueError(f"config: unknown quantization format {fmt!r}; valid formats are {valid_formats()}")
        return QuantConfig.registry[fmt](**fields)
    raise TypeError(f"config: expected a format string, a dsx.quant config or a dict, got {type(config).__name__}")
