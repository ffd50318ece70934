"""Quantization configs: one small frozen dataclass per format, named by the string users pass to ``dsx.quantize``.

A config says what a layer becomes; which layers, calibration and the error budget belong to ``dsx.Quantize``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class QuantConfig:
    """Base of the quantization configs. ``embeddings`` (None, 4 or 8) also quantizes ``nn.Embedding`` tables."""

    format: ClassVar[str] = ""
    qat: ClassVar[bool] = False
    calibrated: ClassVar[bool] = False
    quantizes_linears: ClassVar[bool] = True
    registry: ClassVar[dict[str, type[QuantConfig]]] = {}

    embeddings: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("format"):
            QuantConfig.registry[cls.format] = cls

    def __post_init__(self) -> None:
        if self.embeddings not in (None, 4, 8):
            raise ValueError(f"embeddings: expected None, 4 or 8 (bits of the embedding tables), "
                             f"got {self.embeddings!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"format": ..., **fields}`` (what ``resolve_config`` reads back)."""
        return {"format": self.format, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Int8Dynamic(QuantConfig):
    """``"int8"``: dynamic per-token int8 activations x per-channel symmetric int8 weights, int32 accumulate."""

    format = "int8"
    qat = True


@dataclass(frozen=True)
class Int8WeightOnly(QuantConfig):
    """``"int8_weight_only"`` (W8A16): per-channel int8 weights dequantized inside the matmul."""

    format = "int8_weight_only"
    qat = True


@dataclass(frozen=True)
class FP8Dynamic(QuantConfig):
    """``"fp8"``: row-wise dynamic float8 e4m3 activations x per-channel e4m3 weights via ``torch._scaled_mm``."""

    format = "fp8"


@dataclass(frozen=True)
class FP8WeightOnly(QuantConfig):
    """``"fp8_weight_only"``: per-channel e4m3 weights, dequantized to the activation dtype for the matmul."""

    format = "fp8_weight_only"


@dataclass(frozen=True)
class Int8Static(QuantConfig):
    """``"int8_static"``: per-tensor int8 activation scales calibrated on data, per-channel int8 weights.

    ``observer`` picks the activation range (minmax, percentile, mse, entropy); ``percentile`` is the
    percentile observer's setting; ``smoothquant`` (alpha in [0, 1]) migrates activation outliers into weights.
    """

    format = "int8_static"
    qat = True
    calibrated = True

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


@dataclass(frozen=True)
class NF4(QuantConfig):
    """``"nf4"``: 4-bit NormalFloat weights through bitsandbytes ``Linear4bit``."""

    format = "nf4"


@dataclass(frozen=True)
class LLMInt8(QuantConfig):
    """``"llm_int8"``: bitsandbytes ``Linear8bitLt`` (int8 weights; input columns above 6.0 run in fp16)."""

    format = "llm_int8"


@dataclass(frozen=True)
class EmbeddingOnly(QuantConfig):
    """``"embedding_int8"`` / ``"embedding_int4"``: only the ``nn.Embedding`` tables, linears stay float."""

    format = "embedding"
    quantizes_linears = False

    embeddings: int | None = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embeddings is None:
            raise ValueError("embeddings: an embedding-only config needs 4 or 8 bits, not None")


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
