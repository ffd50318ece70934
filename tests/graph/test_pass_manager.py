from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dsx
from dsx.graph.backend import DsxBackend
from dsx.graph.pass_manager import available_passes, resolve, run_passes

EXPECTED = ["remove_dropout", "fold_batch_norm", "attention_to_sdpa", "add_layer_norm", "add_rms_norm", "rms_norm",
            "gated_mlp", "bias_act", "scaled_masked_softmax"]


def test_registry_order_and_docs():
    passes = available_passes()
    assert list(passes) == EXPECTED
    assert all(p.doc for p in passes.values()), "every pass needs a one-line docstring"


def test_resolve_selection():
    assert [p.name for p in resolve("all")] == EXPECTED
    assert [p.name for p in resolve(["bias_act", "remove_dropout"])] == ["remove_dropout", "bias_act"]
    assert [p.name for p in resolve(None, device="cpu")] == ["remove_dropout", "fold_batch_norm", "attention_to_sdpa"]
    assert [p.name for p in resolve(None, device="cuda")] == EXPECTED


def test_unknown_pass_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown pass 'nope'.*valid passes"):
        resolve(["nope"])
    with pytest.raises(TypeError, match="passes"):
        resolve([3])


def test_run_passes_counts_and_keeps_graph_valid():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU()).eval()
    x = torch.randn(2, 4)
    gm = torch.export.export(m, (x,), strict=False).module()
    counts = run_passes(gm, resolve(["remove_dropout"]))
    assert counts == {"remove_dropout": 1}
    assert not any("dropout" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), m(x))


@pytest.mark.parametrize("make", [lambda p: dsx.Fuse(passes=p), lambda p: dsx.Compile(passes=p),
                                  lambda p: DsxBackend(passes=p)])
def test_passes_of_another_type_are_a_clear_type_error(make):
    with pytest.raises(TypeError, match="passes: expected None, 'all', a pass name or a list of names, got 5"):
        make(5)


def test_fuse_dynamic_batch_must_be_a_boolean():
    with pytest.raises(TypeError, match="dynamic_batch: expected True or False, got 'yes'"):
        dsx.Fuse(dynamic_batch="yes")


def test_passes_do_not_import_the_manager():
    """The run order is declared once in pass_manager.PASSES; a pass module knows nothing of it."""
    import dsx.graph.passes as pkg
    from dsx.graph import pass_manager

    sources = list(Path(pkg.__file__).parent.glob("*.py"))
    assert len(sources) > 5
    for path in sources:
        assert "import pass_manager" not in path.read_text() and "pass_manager import" not in path.read_text(), path
    assert [p.name for p in pass_manager.STRUCTURAL] == EXPECTED[:3]
    assert all(p.kernel for p in pass_manager.KERNELS) and not any(p.kernel for p in pass_manager.STRUCTURAL)
