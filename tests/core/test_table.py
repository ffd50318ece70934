from dsx.core.table import html_table, text_table


def test_text_table_aligns_columns_and_formats_numbers():
    out = text_table(["name", "ms"], [["a", 1.23456], ["longer", 0.000123]]).splitlines()
    assert out[0].index("ms") == out[2].index("1.23") == out[3].index("0.000123")
    assert set(out[1].replace(" ", "")) == {"-"}


def test_html_table_escapes():
    out = html_table(["<h>"], [["a&b"]])
    assert "&lt;h&gt;" in out and "a&amp;b" in out and out.startswith("<table>")
