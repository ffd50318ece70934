"""A Hugging Face ``Cache`` holding keys and values as int8 or float8 codes with one scale per (batch, head, token).

At long contexts the KV cache outgrows the weights; 8-bit codes cut its bytes ~2x against bf16, ~4x against fp32.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn as nn

try:  # the per-layer cache classes appeared in transformers 4.56
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
    _IMPORT_ERROR: Exception | None = None
except ImportError as err:  # transformers missing or too old: the classes below raise on construction
    Cache = DynamicLayer = object
    DynamicCache = None
    _IMPORT_ERROR = err

DTYPES = ("int8", "fp8")
_QMAX = {"int8": 127.0, "fp8": 448.0}
_TINY = torch.finfo(torch.float32).tiny
_CACHE_KWARGS = ("cache", "past_key_values")  # the forward argument's name in transformers 5.x, then in 4.x
_LAYER_TYPES = ("full_attention", "sliding_attention")


def _quantize(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes of ``x [B, H, T, D]`` and float32 scales ``[B, H, T, 1]`` from the amax over ``head_dim``."""
    x = x.float()
    scale = (x.abs().amax(-1, keepdim=True) / _QMAX[dtype]).clamp_min(_TINY)
    scaled = (x / scale).clamp(-_QMAX[dtype], _QMAX[dtype])
    codes = scaled.round().to(torch.int8) if dtype == "int8" else scaled.to(torch.float8_e4m3fn)
    return codes, scale


def _empty(t: torch.Tensor) -> torch.Tensor:
    """A fresh ``[B, H, 0, D]`` tensor like ``t`` (a ``[..., :0, :]`` view would keep ``t``'s storage alive)."""
    return t.new_empty((*t.shape[:-2], 0, t.shape[-1]))


def _nbytes(tensors: list[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache: older tokens as 8-bit codes plus per-token scales, the newest in full precision.

    New tokens join a full-precision residual; when it holds ``residual_length`` tokens or more it is quantized and
    appended to the 8-bit store (per-token scales make appending exact, nothing is re-quantized). ``update``
    returns the dequantized store followed by the residual, in the dtype of the keys and values given.

    Args:
        dtype: ``"int8"`` or ``"fp8"`` (float8 e4m3).
        residual_length: how many recent tokens may stay in full precision (0: quantize every token at once).
    """

    def __init__(self, dtype: str = "int8", residual_length: int = 128) -> None:
        super().__init__()
        self.quant_dtype = dtype
        self.residual_length = residual_length
        self.cumulative_length = 0
        self.is_initialized = False
        self._store: tuple[torch.Tensor, ...] | None = None  # key codes, key scales, value codes, value scales

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Creates the empty residual with the shape, dtype and device of the first states.

        Args:
            key_states: ``[batch, heads, tokens, head_dim]`` keys.
            value_states: values of the same shape (the keys' dtype is used for both when omitted).
        """
        value_states = key_states if value_states is None else value_states
        self.device = key_states.device
        self.keys, self.values = _empty(key_states), _empty(value_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Caches the new states and returns all keys and values of this layer.

        Args:
            key_states: new keys ``[batch, heads, new_tokens, head_dim]``.
            value_states: new values, same shape.

        Returns:
            ``(keys, values)`` over every cached token, in the dtype of ``key_states`` / ``value_states``; this
            call's tokens and the residual ones are exact, older ones dequantized.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        if self._store is None:
            all_keys, all_values = keys, values
        else:
            old_keys, old_values = self._dequantize()
            all_keys, all_values = torch.cat([old_keys, keys], dim=-2), torch.cat([old_values, values], dim=-2)
        if keys.shape[-2] >= self.residual_length:
            new = (*_quantize(keys, self.quant_dtype), *_quantize(values, self.quant_dtype))
            self._store = new if self._store is None else tuple(
                torch.cat([old, part], dim=-2) for old, part in zip(self._store, new))
            keys, values = _empty(keys), _empty(values)
        self.keys, self.values = keys, values
        return all_keys, all_values

    def _dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        key_codes, key_scales, value_codes, value_scales = self._store
        return ((key_codes.float() * key_scales).to(self.keys.dtype),
                (value_codes.float() * value_scales).to(self.values.dtype))

    def get_seq_length(self) -> int:
        """Returns:
            The number of tokens cached, quantized or not.
        """
        return self.cumulative_length

    @property
    def nbytes(self) -> int:
        """Bytes held: 8-bit codes, float32 scales and the full-precision residual."""
        return _nbytes([self.keys, self.values, *(self._store or ())])

    def reset(self) -> None:
        """Drops every cached token, keeping the object for reuse."""
        self.keys = self.values = self._store = None
        self.is_initialized = False
        self.cumulative_length = 0

    def crop(self, max_length: int) -> None:
        """Drops the newest tokens.

        Args:
            max_length: ``-n`` removes the last ``n`` tokens; a positive value is the length to keep (4.x usage).
        """
        keep = max(max_length if max_length > 0 else self.cumulative_length + max_length, 0)
        if not self.is_initialized or keep >= self.cumulative_length:
            return
        stored = self.cumulative_length - self.keys.shape[-2]
        if keep >= stored:
            self.keys, self.values = self.keys[..., :keep - stored, :], self.values[..., :keep - stored, :]
        else:
            self._store = tuple(t[..., :keep, :].clone() for t in self._store)
            self.keys, self.values = _empty(self.keys), _empty(self.values)
        self.cumulative_length = keep

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Applies a batch-dimension ``fn`` to every stored tensor (exact: scales are per batch row)."""
        if self.cumulative_length == 0:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self._store is not None:
            self._store = tuple(fn(t) for t in self._store)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorders the batch for beam search.

        Args:
            beam_idx: the batch rows to take, in order.
        """
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeats each batch row ``repeats`` times (contrastive search, beam expansion).

        Args:
            repeats: copies of each row.
        """
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps only the batch rows ``indices``.

        Args:
            indices: the rows to keep.
        """
        self._map(lambda t: t[indices, ...])


def _attention_layers(config: Any) -> int:
    """The number of decoder layers of ``config``, checked to be full- or sliding-window attention."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers, heads = getattr(text, "num_hidden_layers", None), getattr(text, "num_attention_heads", None)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (layers, heads)):
        raise ValueError(f"kv_cache: the config has no attention layers/heads (num_hidden_layers={layers!r}, "
                         f"num_attention_heads={heads!r}); pass the config of a decoder with attention.")
    other = sorted(set(getattr(text, "layer_types", None) or ()) - set(_LAYER_TYPES))
    if other:
        raise ValueError(f"kv_cache: QuantizedCache holds only {_LAYER_TYPES} layers; the config also has {other}.")
    return layers


class QuantizedCache(Cache):
    """A Hugging Face ``Cache`` storing keys and values as 8-bit codes with one scale per (batch, head, token).

    Use it as ``model.generate(ids, past_key_values=QuantizedCache(model.config), max_new_tokens=...)`` (``cache=``
    in transformers 5.x), or let ``use_quantized_cache`` install one on every call. The scale is the amax over
    ``head_dim``, so a token's codes use the full 8-bit range whatever the other tokens hold. The most recent tokens
    (fewer than ``residual_length``) stay in full precision, as in transformers' ``QuantizedLayer``. Sliding-window
    layers keep every token (correct, as the mask still applies the window, but without a window's saving).

    Args:
        config: the model's ``PretrainedConfig`` (the text config of a multimodal one is used).
        dtype: ``"int8"`` (codes in [-127, 127]) or ``"fp8"`` (float8 e4m3, |x| <= 448).
        residual_length: tokens kept in full precision before they are quantized; 0 quantizes everything.

    Raises:
        ImportError: transformers is missing or older than 4.56 (no ``transformers.cache_utils.DynamicLayer``).
        ValueError: ``dtype`` is not one of ``DTYPES``; ``residual_length`` is not a non-negative int; ``config``
            has no attention layers/heads or has layers other than full / sliding-window attention.
        RuntimeError: ``dtype="fp8"`` but this torch has no ``float8_e4m3fn``.
    """

    def __init__(self, config: Any, dtype: str = "int8", residual_length: int = 128) -> None:
        if _IMPORT_ERROR is not None:
            raise ImportError("kv_cache: QuantizedCache needs transformers >= 4.56 (transformers.cache_utils."
                              f"Cache, DynamicCache, DynamicLayer): {_IMPORT_ERROR}")
        if dtype not in DTYPES:
            raise ValueError(f"kv_cache: dtype must be one of {DTYPES}, got {dtype!r}")
        if dtype == "fp8" and not hasattr(torch, "float8_e4m3fn"):
            raise RuntimeError("kv_cache: dtype='fp8' needs torch.float8_e4m3fn, missing from this torch build")
        if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"kv_cache: residual_length must be a non-negative int, got {residual_length!r}")
        layers = _attention_layers(config)
        super().__init__(layers=[QuantizedKVLayer(dtype, residual_length) for _ in range(layers)])
        self.quant_dtype = dtype
        self.residual_length = residual_length

    @property
    def nbytes(self) -> int:
        """Bytes held over all layers: 8-bit codes + float32 scales + full-precision residual."""
        return sum(layer.nbytes for layer in self.layers)


def cache_bytes(cache: Any) -> int:
    """Bytes of key/value storage held by a Hugging Face cache, quantized or not.

    Args:
        cache: a ``QuantizedCache``, a ``DynamicCache`` (or any ``Cache`` with ``layers`` holding ``keys`` and
            ``values``), or an ``EncoderDecoderCache`` (both of its caches are counted).

    Returns:
        The bytes of the tensors the cache holds (codes, scales and residual for ``QuantizedCache``).

    Raises:
        TypeError: ``cache`` is not a Hugging Face cache.
    """
    if hasattr(cache, "self_attention_cache"):
        return cache_bytes(cache.self_attention_cache) + cache_bytes(cache.cross_attention_cache)
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise TypeError(f"kv_cache: cache_bytes expects a transformers Cache, got {type(cache).__name__}")
    return sum(layer.nbytes if isinstance(layer, QuantizedKVLayer)
               else _nbytes([getattr(layer, "keys", None), getattr(layer, "values", None)]) for layer in layers)


class QuantizedCacheHandle:
    """What ``use_quantized_cache`` returns: ``remove()`` takes the hook off and clears ``model.dsx_kv_cache``.

    Args:
        model: the model the hook is on.
        handle: the forward pre-hook's handle.
    """

    def __init__(self, model: nn.Module, handle: torch.utils.hooks.RemovableHandle) -> None:
        self.model, self.handle = model, handle

    def remove(self) -> None:
        """Removes the hook; the model's later calls use Hugging Face's default cache again."""
        self.handle.remove()
        if getattr(self.model, "_dsx_kv_cache_handle", None) is self:
            del self.model._dsx_kv_cache_handle, self.model.dsx_kv_cache


def _cache_argument(model: nn.Module) -> tuple[str, int] | None:
    """The name and position of ``model.forward``'s cache argument, if ``model`` is a generative HF decoder."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    config = getattr(model, "config", None)
    if (not isinstance(model, PreTrainedModel) or not model.can_generate() or config is None
            or getattr(config, "is_encoder_decoder", False)
            or not getattr(model, "_supports_default_dynamic_cache", lambda: True)()):
        return None
    params = list(inspect.signature(model.forward).parameters)
    name = next((k for k in _CACHE_KWARGS if k in params), None)
    return None if name is None else (name, params.index(name))


def use_quantized_cache(model: nn.Module, dtype: str = "int8", residual_length: int = 128) -> QuantizedCacheHandle:
    """Makes ``model.generate(...)`` and ``model(..., use_cache=True)`` use a fresh ``QuantizedCache`` by themselves.

    A forward pre-hook replaces the call's cache with a new ``QuantizedCache(model.config, dtype, residual_length)``
    when caching is on and the cache is missing or an empty ``DynamicCache`` (what ``generate`` creates); the model
    returns that cache and ``generate`` threads it through every decode step. Caches that already hold tokens, and
    caches of other types, are left alone. Sets ``model.dsx_kv_cache = dtype`` (a plain attribute: it does not
    survive ``state_dict``). Calling it again replaces the previous hook.

    Args:
        model: a Hugging Face generative decoder (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...).
        dtype: ``"int8"`` or ``"fp8"``.
        residual_length: tokens kept in full precision, see ``QuantizedCache``.

    Returns:
        A handle whose ``remove()`` restores the default cache.

    Raises:
        ValueError: ``model`` is not a generative Hugging Face model with a KV cache (e.g. ``BertModel``, an
            encoder-decoder, a plain ``nn.Module``); or bad ``dtype`` / ``residual_length`` / config, as
            ``QuantizedCache`` raises.
    """
    argument = _cache_argument(model)
    if argument is None:
        raise ValueError(f"kv_cache: the model has no KV cache ({type(model).__name__}); use_quantized_cache needs a "
                         "Hugging Face generative decoder such as LlamaForCausalLM.")
    QuantizedCache(model.config, dtype, residual_length)  # validates the arguments before anything is installed
    name, position = argument

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if len(args) > position:  # the cache was passed positionally: leave the call as it is
            return None
        key = next((k for k in _CACHE_KWARGS if k in kwargs), name)
        cache, use_cache = kwargs.get(key), kwargs.get("use_cache")
        use_cache = getattr(module.config, "use_cache", True) if use_cache is None else use_cache
        empty = cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0)
        if not (use_cache and empty):
            return None
        kwargs[key] = QuantizedCache(module.config, dtype, residual_length)
        return args, kwargs

    previous = getattr(model, "_dsx_kv_cache_handle", None)
    if previous is not None:
        previous.remove()
    handle = QuantizedCacheHandle(model, model.register_forward_pre_hook(hook, with_kwargs=True))
    model._dsx_kv_cache_handle, model.dsx_kv_cache = handle, dtype
    return handle
