"""dsx.core.checks: flags, paths, module-name lists and dynamic_shapes are refused with the argument's name."""

import pytest

from dsx.core.checks import (
    check_dynamic_shapes, check_flag, check_names, check_path, check_positive_int, check_positive_number, matches,
)


@pytest.mark.parametrize("value", ["no", 1, None, 0.0])
def test_flags_are_booleans_only(value):
    assert check_flag("verify", True) is True
    with pytest.raises(TypeError, match=f"verify: expected True or False, got {value!r}"):
        check_flag("verify", value)


def test_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    assert check_path("path", str(tmp_path / "new"), directory=True) == tmp_path / "new"
    with pytest.raises(TypeError, match="path: expected a path"):
        check_path("path", None)
    with pytest.raises(ValueError, match="path: .*file is a file; a directory is written there"):
        check_path("path", tmp_path / "file", directory=True)
    with pytest.raises(ValueError, match="path: .*dir is a directory; a file is written there"):
        check_path("path", tmp_path / "dir", directory=False)
    with pytest.raises(ValueError, match="path: .*file is a file, not a directory"):
        check_path("path", tmp_path / "file" / "deeper" / "m.onnx", directory=False)


def test_names_and_patterns():
    assert check_names("skip", ("a", "re:b.*")) == ["a", "re:b.*"]
    with pytest.raises(TypeError, match="skip: .*; wrap it in a list"):
        check_names("skip", "head")
    with pytest.raises(TypeError, match="skip: expected module names \\(str\\), got 0 \\(int\\)"):
        check_names("skip", [0])
    with pytest.raises(ValueError, match="skip: 're:\\(' is not a valid regular expression"):
        check_names("skip", ["re:("])
    assert check_names("layers", ["re:("], patterns=False) == ["re:("]
    assert matches("a.b", "a") and matches("a.b", "re:a\\..") and not matches("ab", "a")


@pytest.mark.parametrize("value", [None, "batch", {"x": None}, ({0: None},), []])
def test_dynamic_shapes_accepted(value):
    check_dynamic_shapes(value)


@pytest.mark.parametrize("value", ["dynamic", 0, True])
def test_dynamic_shapes_refused(value):
    with pytest.raises(TypeError, match="dynamic_shapes: expected a torch.export spec"):
        check_dynamic_shapes(value)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", None])
def test_positive_int_refuses(value):
    with pytest.raises(ValueError, match=r"round_to: expected a positive int, got"):
        check_positive_int("round_to", value)


def test_positive_int_and_number_accept():
    assert check_positive_int("n", 3) == 3 and check_positive_int("n", None, optional=True) is None
    assert check_positive_number("damp", 0.01) == 0.01


@pytest.mark.parametrize("value", [0, -0.5, float("nan"), False, "1"])
def test_positive_number_refuses(value):
    with pytest.raises(ValueError, match="damp: expected a positive number"):
        check_positive_number("damp", value)


def test_a_pattern_that_picks_a_block_picks_its_children():
    assert matches("model.layers.0.self_attn.q_proj", "re:.*self_attn")
    assert not matches("model.layers.0.mlp", "re:.*self_attn") and not matches("ab.c", "re:a")
