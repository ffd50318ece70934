"""Hugging Face model folders in and out: a model from a local ``save_pretrained`` folder (JSON config and
safetensors weights only: never pickle, never remote code), example inputs from its config, and dsx saves of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dsx.core.checks import check_path
from dsx.core.serialize import META, is_save, load, read_meta

TASKS = {"auto": None, "base": "AutoModel", "causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
         "seq2seq-lm": "AutoModelForSeq2SeqLM", "sequence-classification": "AutoModelForSequenceClassification",
         "token-classification": "AutoModelForTokenClassification",
         "question-answering": "AutoModelForQuestionAnswering",
         "image-classification": "AutoModelForImageClassification"}
"""``task`` names and the ``transformers`` auto class each loads; ``auto`` takes the class ``config.json`` names."""


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a Hugging Face ``config.json``."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError('loading a Hugging Face folder needs transformers: pip install transformers') from e
    return transformers


def _config(folder: Path) -> Any:
    """The folder's config, read as JSON; a config that asks for custom code is refused."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model: {folder / 'config.json'} is not a readable JSON config: {e}") from None
    if not isinstance(raw, dict) or "auto_map" in raw:
        raise ValueError(f"model: {folder / 'config.json'} asks for custom model code (auto_map); dsx never runs "
                         "code from a model folder")
    try:
        return _transformers().AutoConfig.from_pretrained(str(folder), trust_remote_code=False,
                                                          local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"model: transformers cannot read {folder / 'config.json'}: {e}") from None


def _architecture(config: Any, task: str, folder: Path) -> Any:
    """The class (or auto class) that builds ``config``'s model for ``task``."""
    transformers = _transformers()
    if TASKS[task] is not None:
        return getattr(transformers, TASKS[task])
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if names and not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model: {folder / 'config.json'} names the architecture {names[0]!r}, which transformers "
                         f"does not define; pass task= one of {sorted(TASKS)}")
    return cls or transformers.AutoModel


def from_pretrained(folder: str | os.PathLike, *, task: str = "auto") -> nn.Module:
    """Load a Hugging Face model folder in eval mode: one ``save_pretrained`` wrote, or a ``dsx.save`` of a
    Hugging Face model (then its transforms are replayed on a fresh instance of the saved class, whatever
    ``task``, and its weights load bit-exactly).

    Args:
        folder: a local directory with ``config.json`` and ``model.safetensors`` (or sharded safetensors).
        task: which head to build: ``"auto"`` (the class ``config.json`` names) or one of ``TASKS``.

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: ``folder`` is not a directory with a ``config.json``.
        ValueError: an unknown ``task``, a config asking for custom code, weights that are not safetensors,
            or a dsx save of a class that is not a ``transformers`` one.
    """
    folder = check_path("folder", folder)
    if not isinstance(task, str) or task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    if not is_hf_folder(folder):
        raise FileNotFoundError(f"folder: {folder} is not a Hugging Face model folder (no config.json)")
    config = _config(folder)
    if is_save(folder):
        origin = read_meta(folder)["origin"]
        name = origin.rsplit(".", 1)[-1]
        if not origin.startswith("transformers.") or not hasattr(_transformers(), name):
            raise ValueError(f"folder: {folder / META} was saved from {origin!r}, not a transformers class; rebuild "
                             "it with dsx.load(YourModel(), folder)")
        return load(getattr(_transformers(), name)(config).eval(), folder)
    cls = _architecture(config, task, folder)
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"folder: {folder} holds no .safetensors weights; dsx reads safetensors only (never "
                         "pickled .bin / .pt files); convert them with save_pretrained first")
    model = cls.from_pretrained(str(folder), config=config, use_safetensors=True, trust_remote_code=False,
                                local_files_only=True)
    return model.eval()


def _image_size(config: Any) -> tuple[int, int]:
    size = getattr(config, "image_size", 224)
    if isinstance(size, dict):
        return size.get("height", size.get("shortest_edge", 224)), size.get("width", size.get("shortest_edge", 224))
    return (size, size) if isinstance(size, int) else tuple(size)[:2]


def hf_example_inputs(model: nn.Module, *, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tokenizer-free example inputs for a Hugging Face model, built from its config: random token ids and a
    full attention mask for text, random pixels at the configured image size for vision, random audio for audio
    models (plus decoder ids for encoder-decoders).

    Args:
        model: a ``transformers`` model.
        batch: the batch size.
        seq: the text length (tokens).
        seed: the random seed.

    Returns:
        The inputs as keyword arguments.

    Raises:
        ValueError: a model whose main input is none of the above (pass the inputs yourself).
    """
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", "input_ids")
    if config is None:
        raise ValueError(f"model: {type(model).__name__} has no Hugging Face config to build example inputs from")
    gen = torch.Generator().manual_seed(seed)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or 100
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    if name == "input_ids":
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    elif name == "pixel_values":
        channels = getattr(config, "num_channels", 3)
        inputs = {"pixel_values": torch.randn(batch, channels, *_image_size(config), generator=gen)}
    elif name == "input_values":
        inputs = {"input_values": torch.randn(batch, 3200, generator=gen)}
    elif name == "input_features":
        frames = 2 * getattr(config, "max_source_positions", 1500)
        inputs = {"input_features": torch.randn(batch, getattr(config, "num_mel_bins", 80), frames, generator=gen)}
    else:
        raise ValueError(f"model: cannot build example inputs for a model whose main input is {name!r}; pass them "
                         "yourself (--input-shape or --inputs on the command line)")
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None) or 0
        inputs["decoder_input_ids"] = torch.full((batch, min(seq, 4)), start, dtype=torch.long)
    return inputs
