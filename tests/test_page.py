"""`vitlens.page`, the pieces the report and compare pages share, against hand-written HTML and Markdown."""

from __future__ import annotations

from vitlens.page import html_table, markdown_cell, markdown_table, png_figure


def test_html_table_escapes_every_cell_unless_told_they_are_html():
    rows = [["a<b", "x & y"], ["1", "2"]]
    assert html_table(["<k>", "v"], rows) == (
        "<table><tr><th>&lt;k&gt;</th><th>v</th></tr>"
        "<tr><td>a&lt;b</td><td>x &amp; y</td></tr><tr><td>1</td><td>2</td></tr></table>"
    )
    # Body cells built as HTML pass through; the header is still escaped.
    linked = [['<a href="#x">x</a>', "&middot;"]]
    assert html_table(["a&b", "c"], linked, escape=False) == (
        '<table><tr><th>a&amp;b</th><th>c</th></tr><tr><td><a href="#x">x</a></td><td>&middot;</td></tr></table>'
    )
    assert html_table(None, [["k", "v"]]) == "<table><tr><td>k</td><td>v</td></tr></table>"


def test_png_figure_inlines_the_bytes_as_base64_with_an_escaped_alt():
    # b"\x89PNG" is "iVBORw==" in base64.
    assert png_figure(b"\x89PNG", 'a"<b>.png') == (
        '<figure><img alt="a&quot;&lt;b&gt;.png" src="data:image/png;base64,iVBORw=="></figure>'
    )


def test_markdown_cell_escapes_pipes_and_joins_lines():
    assert markdown_cell("a|b\nc") == "a\\|b c"
    assert markdown_cell("<b> & c") == "<b> & c"  # Markdown tables take HTML as it is
    assert markdown_cell(3) == "3" and markdown_cell(None) == "None"


def test_markdown_table_header_delimiter_and_rows():
    table = markdown_table(["name", "a|b"], [["x\ny", 1], ["z", "p|q"]])
    assert table == "| name | a\\|b |\n|---|---|\n| x y | 1 |\n| z | p\\|q |"
    assert markdown_table(["only"], []) == "| only |\n|---|"


def test_markdown_table_alignment_row():
    table = markdown_table(["a", "b", "c", "d"], [[1, 2, 3, 4]], align=[None, "left", "center", "right"])
    assert table == "| a | b | c | d |\n|---|:---|:---:|---:|\n| 1 | 2 | 3 | 4 |"
