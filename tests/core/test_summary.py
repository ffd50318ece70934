"""Tests for dsx.core.summary: totals with shared storage counted once, rows from the history, text/HTML/dict forms."""

import json
from dataclasses import dataclass

import torch
import torch.nn as nn

from dsx.core.summary import summary
from dsx.core.transform import Transform


@dataclass
class Halve(Transform):
    name = "tsum_halve"
    stage = "compress"
    tolerance = {torch.float32: 1.0}
    note: str = "a<b"

    def apply(self, model, inputs):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        return model, {"fusions": {"linear_gelu": 0, "rms_norm": 2}, "notes": [], "eager": None}


@dataclass
class Mark(Transform):
    name = "tsum_mark"
    stage = "fuse"

    def apply(self, model, inputs):
        return model, {}


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("q", torch.zeros(3, 5, dtype=torch.int8))
        self.register_buffer("view", self.emb.weight.detach()[:2])
        self.half = nn.Linear(4, 4).to(torch.bfloat16)

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_plain_model_totals_count_shared_storage_once():
    s = summary(Tied())
    assert s.parameters == 10 * 4 + (4 * 4 + 4)
    assert s.buffers == 3 * 5
    assert s.dtypes == {"float32": 40 * 4, "bfloat16": 20 * 2, "int8": 15}
    assert s.bytes == 160 + 40 + 15
    assert s.rows == [] and s.origin.endswith(".Tied")
    assert "no dsx transforms applied" in str(s) and "no dsx transforms applied" in s._repr_html_()
    assert "215 B" in str(s) and "parameters:" in str(s)


def test_rows_from_history():
    x = torch.randn(3, 8)
    model = Mark()(Halve()(nn.Sequential(nn.Linear(8, 8), nn.GELU()), x))
    s = summary(model)
    assert [r["transform"] for r in s.rows] == ["tsum_halve", "tsum_mark"]
    first, second = s.rows
    assert first["config"] == {"note": "a<b"} and first["tolerance"] == 1.0
    assert 0.3 < first["max_rel"] < 0.7
    assert second["max_rel"] is None and second["tolerance"] is None
    assert s.parameters == 72 and s.bytes == 72 * 4 and s.dtypes == {"float32": 288}


def test_text_table_is_aligned_and_compact():
    model = Mark()(Halve()(nn.Linear(8, 8), torch.randn(2, 8)))
    lines = str(summary(model)).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    assert set(lines[header + 1]) == {"-", " "}
    table = [lines[header], *lines[header + 2:header + 4]]
    for col in ("transform", "stage", "config", "max rel err", "tolerance", "info"):
        start = table[0].index(col)
        assert all(row[start - 2:start] == "  " and row[start] != " " for row in table[1:]), col
    assert "tsum_halve" in table[1] and "note=a<b" in table[1]
    assert "fusions={rms_norm=2}" in table[1] and "linear_gelu" not in table[1] and "notes" not in table[1]
    assert table[2].split()[4:6] == ["-", "-"]


def test_long_cells_are_clipped_in_text_only():
    model = Halve(note="x" * 200)(nn.Linear(2, 2))
    s = summary(model)
    assert "x" * 200 not in str(s) and "..." in str(s)
    assert "x" * 200 in s._repr_html_()


def test_html_escapes_and_has_tables():
    model = Halve()(nn.Linear(8, 8), torch.randn(2, 8))
    page = summary(model)._repr_html_()
    assert "<th>transform</th>" in page and "<td>tsum_halve</td>" in page
    assert "note=a&lt;b" in page and "a<b" not in page


def test_to_dict_is_json_able():
    model = Halve()(Tied())
    d = summary(model).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["rows"][0]["info"]["fusions"] == {"linear_gelu": 0, "rms_norm": 2}
    assert d["parameters"] == 60 and d["dtypes"]["int8"] == 15
