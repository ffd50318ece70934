from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dsx.export.result import ExportResult, returns_cache, unpadded, without_cache


def test_one_line_summary_says_whether_it_was_verified():
    assert str(ExportResult(Path("m.onnx"), "onnx")) == "onnx -> m.onnx (not verified)"
    verified = ExportResult(Path("m.pt2"), "pt2", max_abs=1.5e-7, max_rel=2e-7)
    assert str(verified) == "pt2 -> m.pt2 (max abs 1.5e-07, max rel 2e-07)"


class _Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom inside")


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_a_model_raising_on_its_inputs_is_a_clear_error_before_exporting(tmp_path, suffix):
    import dsx

    with pytest.raises(ValueError, match=r"example_inputs: the model raised RuntimeError .*: boom inside"):
        dsx.export(_Raises(), torch.randn(2, 4), tmp_path / f"m{suffix}")
    with pytest.raises(ValueError, match=r"example_inputs: the model raised RuntimeError .*\(2x5 and 4x3\)"):
        dsx.export(nn.Linear(4, 3), torch.randn(2, 5), tmp_path / f"n{suffix}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_exporting_a_training_model_leaves_its_batchnorm_statistics_alone(tmp_path, suffix):
    import dsx
    from dsx.models import TinyResNet, randomize_batchnorm

    model = randomize_batchnorm(TinyResNet(width=8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dsx.export(model, torch.randn(2, 3, 16, 16), tmp_path / f"m{suffix}")
    assert model.training and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_unpadded_zeroes_only_padded_positions_of_sequence_outputs():
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    seq, pooled = torch.ones(2, 3, 4), torch.ones(2, 4)
    out = unpadded(((), {"attention_mask": mask}), [seq, pooled, "note"])
    assert out[0][1, 0].abs().sum() == 0 and out[0].sum() == 20 and out[1] is pooled and out[2] == "note"
    assert unpadded(((), {"attention_mask": torch.ones(2, 3)}), [seq])[0] is seq
    assert unpadded(((seq,), {}), [seq])[0] is seq


class _Cached(nn.Module):
    def forward(self, x, cache=None, use_cache=None):
        return x


def test_without_cache_asks_a_decoder_not_to_return_its_cache():
    x = torch.ones(2)
    assert without_cache(_Cached(), ((x,), {})) == (((x,), {"use_cache": False}),
                                                      ["exported without its KV cache (use_cache=False)"])
    with pytest.raises(ValueError, match="kv_cache=True"):
        without_cache(_Cached(), ((x,), {"use_cache": True}))
    with pytest.raises(ValueError, match="model: Identity returns a cache object"):
        without_cache(nn.Identity(), ((x,), {}))


def test_returns_cache_finds_a_cache_in_a_model_output():
    transformers = pytest.importorskip("transformers")
    cache = transformers.DynamicCache()
    assert returns_cache({"logits": torch.ones(1), "cache": cache}) and not returns_cache((torch.ones(1), [2]))
