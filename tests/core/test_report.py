"""The optimize report: JSON round trip, text and HTML forms, the trade-off plot."""

import pytest

from dsx.core.report import PlanRow, Report


def sample():
    return Report([PlanRow("original", "ok", 10.0, None, 1.0, 0.0, 4.0, won=False),
                   PlanRow("int8", "ok", 4.0, 0.02, 2.5, 0.003, 1.0, kept_float=1, won=True),
                   PlanRow("fp8", "failed: ValueError: no fp8 here")],
                  metric="cosine", max_error=0.01, device="cpu", workload="forward on the example inputs",
                  notes=["search took 1.0 s"])


def test_round_trip_text_and_html():
    rep = sample()
    again = Report.from_dict(rep.to_dict())
    assert again == rep and again.winner.plan == "int8"
    text = str(rep)
    assert text.splitlines()[0] == "dsx.optimize on cpu: cosine <= 0.01; timed: forward on the example inputs"
    assert "2.50x" in text and "failed: ValueError" in text and text.endswith("search took 1.0 s")
    assert rep._repr_html_().count("<tr>") == 4


def test_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    path = sample().plot(tmp_path / "tradeoff.png")
    assert path.stat().st_size > 1000
