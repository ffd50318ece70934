"""dsx.parallel.safe_dcp: DCP metadata is unpickled with an allowlist; anything else is refused and never runs."""

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dsx.parallel.safe_dcp import load_metadata


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def metadata(tmp_path):
    dcp.save({"w": torch.ones(3), "lr": 0.1}, checkpoint_id=tmp_path / "c", no_dist=True)
    return (tmp_path / "c" / ".metadata").read_bytes()


def test_real_metadata_loads(metadata):
    meta = load_metadata(metadata, ".metadata")
    assert {"w", "lr"} <= set(meta.state_dict_metadata)


def test_other_globals_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="load_checkpoint: .metadata refused"):
        load_metadata(pickle.dumps(_RunsCode(marker)), ".metadata")
    assert not marker.exists()


def test_not_metadata_and_corrupt_bytes(metadata):
    with pytest.raises(ValueError, match="is not torch.distributed.checkpoint metadata"):
        load_metadata(pickle.dumps([1, 2]), ".metadata")
    with pytest.raises(ValueError, match="refused"):
        load_metadata(metadata[: len(metadata) // 2], ".metadata")
