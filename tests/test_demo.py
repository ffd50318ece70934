from dsx.demo import HEADERS, run_demo


def test_demo_rows_are_verified_and_report_fusions():
    rows = run_demo(device="cpu", iters=1, progress=False)
    table = {r[0]: dict(zip(HEADERS, r)) for r in rows}
    assert set(table) == {"tiny-gpt", "tiny-resnet"}
    for row in table.values():
        assert row["max abs err"] < 1e-3
        assert all(row[k] > 0 for k in ("eager ms", "compile ms", "dsx ms", "dsx+compile ms"))
    assert "attention_to_sdpa=2" in table["tiny-gpt"]["fusions fired"]
    assert "remove_dropout=6" in table["tiny-gpt"]["fusions fired"]
    assert table["tiny-resnet"]["fusions fired"] == "fold_batch_norm=9"
