"""Read torch.distributed.checkpoint directories without running code from them.

DCP unpickles ``.metadata`` with plain ``pickle`` and non-tensor entries with ``torch.load(weights_only=False)``;
``SafeReader`` and ``SafeLoadPlanner`` (its public extension points) allow only the checkpoint metadata classes.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path, PurePath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata

ALLOWED: dict[str, set[str]] = {
    dcp_metadata.__name__: {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
                            "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
}
"""The globals a DCP ``.metadata`` pickle may name (plus ``torch``'s dtype, layout and memory-format constants)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata class")


def load_metadata(data: bytes, where: str) -> dcp_metadata.Metadata:
    """Unpickle a DCP ``.metadata`` file's bytes allowing only ``ALLOWED``.

    Raises:
        ValueError: the file names any other global (a crafted file), is corrupt, or points a shard outside the
            checkpoint directory.
    """
    try:
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise ValueError(f"load_checkpoint: {where} refused: {e}; a checkpoint's .metadata holds only DCP's metadata "
                         "classes, so it was not loaded") from None
    if not isinstance(meta, dcp_metadata.Metadata):
        raise ValueError(f"load_checkpoint: {where} is not torch.distributed.checkpoint metadata "
                         f"(got {type(meta).__name__})")
    for info in (meta.storage_data or {}).values():
        rel = PurePath(str(getattr(info, "relative_path", "")))
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"load_checkpoint: {where} refused: a shard path {str(rel)!r} leaves the checkpoint")
    return meta


def check_entries(ckpt: Path, meta: dcp_metadata.Metadata) -> None:
    """Refuse the checkpoint before anything is loaded unless each non-tensor entry (optimizer hyper-parameters,
    extra state) unpickles with ``torch.load(weights_only=True)``.

    Raises:
        ValueError: an entry needs more (a crafted file), uses a storage transform, or its shard is missing.
    """
    for index, info in (meta.storage_data or {}).items():
        if not isinstance(meta.state_dict_metadata.get(index.fqn), dcp_metadata.BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"load_checkpoint: {ckpt}: the entry {index.fqn} uses storage transforms "
                             f"{info.transform_descriptors}, which dsx checkpoints never do")
        try:
            with open(ckpt / info.relative_path, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        except OSError as e:
            raise ValueError(f"load_checkpoint: {ckpt}: the shard of {index.fqn} is unreadable: {e}") from None
        except Exception as e:
            raise ValueError(f"load_checkpoint: the entry {index.fqn} refused: it needs more than weights-only "
                             f"unpickling ({type(e).__name__}); nothing was loaded") from None


class SafeReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` goes through ``load_metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            meta = load_metadata(f.read(), os.fspath(path))
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = dcp_metadata.StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """``DefaultLoadPlanner`` loading non-tensor entries with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise ValueError(f"load_checkpoint: the entry {read_item.dest_index.fqn} refused: it needs more than "
                             f"weights-only unpickling ({type(e).__name__})") from None
        super().load_bytes(read_item, _saved(obj))


def _saved(obj: Any) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
