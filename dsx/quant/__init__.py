"""Quantization: int8 / fp8 / int8-static / QAT / bitsandbytes / embedding / bf16 formats as ``dsx.Quantize`` configs.

``dsx.quantize(model, "int8")`` is the entry point; the config objects here customise a format.
"""

from dsx.quant.config import (NF4, BFloat16, EmbeddingOnly, Float16, FP8Dynamic, FP8WeightOnly, Int8Dynamic,
                              Int8Static, Int8WeightOnly, LLMInt8, QuantConfig, valid_formats)
from dsx.quant.quantize import Convert, Quantize, convert, quantize

__all__ = ["BFloat16", "Convert", "EmbeddingOnly", "FP8Dynamic", "FP8WeightOnly", "Float16", "Int8Dynamic",
           "Int8Static", "Int8WeightOnly", "LLMInt8", "NF4", "QuantConfig", "Quantize", "convert", "quantize",
           "valid_formats"]
