"""Quantization: int8 / int4 / fp8 / int8-static / QAT / bitsandbytes / embedding / bf16 formats as ``dsx.Quantize``
configs, and the 8-bit KV cache.

``dsx.quantize(model, "int8")`` is the entry point; the config objects here customise a format.
"""

from dsx.quant.config import (NF4, BFloat16, EmbeddingOnly, Float16, FP8Dynamic, FP8WeightOnly, Int4WeightOnly,
                              Int8Dynamic, Int8Static, Int8W7, Int8WeightOnly, LLMInt8, QuantConfig, valid_formats)
from dsx.quant.kv_cache import QuantizedCache, cache_bytes, use_quantized_cache
from dsx.quant.quantize import Convert, Quantize, convert, quantize

__all__ = ["BFloat16", "Convert", "EmbeddingOnly", "FP8Dynamic", "FP8WeightOnly", "Float16", "Int4WeightOnly",
           "Int8Dynamic", "Int8Static", "Int8W7", "Int8WeightOnly", "LLMInt8", "NF4", "QuantConfig",
           "QuantizedCache", "Quantize", "cache_bytes", "convert", "quantize", "use_quantized_cache", "valid_formats"]
