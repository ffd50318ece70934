from pathlib import Path

from dsx.export.result import ExportResult


def test_one_line_summary_says_whether_it_was_verified():
    assert str(ExportResult(Path("m.onnx"), "onnx")) == "onnx -> m.onnx (not verified)"
    verified = ExportResult(Path("m.pt2"), "pt2", max_abs=1.5e-7, max_rel=2e-7)
    assert str(verified) == "pt2 -> m.pt2 (max abs 1.5e-07, max rel 2e-07)"
