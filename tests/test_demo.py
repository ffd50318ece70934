from dsx.demo import HEADERS, run_demo


def test_demo_rows_are_drop_ins_within_their_budgets():
    rows = run_demo(device="cpu", budget_s=2.0, progress=False)
    table = {(r[0], r[1]): dict(zip(HEADERS, r)) for r in rows}
    models = {m for m, _ in table}
    assert {"tiny-gpt", "tiny-resnet"} <= models and len(rows) == 2 * len(models)
    for (model, search), row in table.items():
        limit = 1e-4 if search == "lossless" else 0.01
        assert row["error"] <= limit and float(row["speed-up"].rstrip("x")) >= 1.0
        assert row["check"] in ("batch 1: ok", "generate() tokens identical") or search != "lossless"
