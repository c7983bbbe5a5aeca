"""The table's picture (cwm_ray.evaluate.table_plot.plot_table): a real PNG for every shape of table.

Why: jobs/reproduce.py writes table.png beside table.md at the end of a 20-minute run; a table with one seed
(no spreads), a row not evaluated (None) or only the copy row must still give a picture, never a crash
that loses the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cwm_ray.evaluate.table_plot import plot_table

COLUMNS = ["toy_score", "toy_edit_success", "toy_minimal_edit", "idm_agreement", "l1"]
PARTS = ("toy_score", "toy_edit_success", "toy_minimal_edit")


def _row(name: str, values: tuple[float | None, float | None, float | None], spreads: bool | None,
         seeds: int = 3) -> dict:
    row: dict = {"row": name, "items": 300, "seeds": seeds, "idm_agreement": 0.02, "l1": 0.03}
    for metric, value in zip(PARTS, values, strict=True):
        row[metric] = value
        if spreads is True:
            row[f"{metric}_spread"] = 0.3
        elif spreads is None:
            row[f"{metric}_spread"] = None
    return row


def _table(spreads: bool | None) -> dict:
    return {"rows": [_row("(a) gold only", (4.1, 5.0, 9.1), spreads),
                     _row("(b) + IDM-annotated synthetic", (4.4, None, 8.7), spreads),
                     _row("(c) + recognition weighting", (None, None, None), spreads),
                     _row("(c) + recognition weighting + best-of-8", (0.0, 3.2, 0.0), spreads),
                     _row("copy the source", (0.0, 0.0, 10.0), False, seeds=1)],
            "columns": COLUMNS}


def _check_png(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 5_000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 400 <= width <= 1200 and 200 <= height <= 2000
        assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # drawn, not blank
    return width, height


@pytest.mark.parametrize("spreads", [True, False, None], ids=["spreads", "no-spread-keys", "spreads-None"])
def test_plot_table_writes_a_png(tmp_path: Path, spreads: bool | None) -> None:
    path = tmp_path / "nested" / "table.png"  # the parent is made
    plot_table(_table(spreads), path)
    _check_png(path)


def test_plot_table_takes_a_str_path_one_row_and_other_columns(tmp_path: Path) -> None:
    one = {"rows": [{"row": "(a) gold only", "items": 10, "toy_score": 0.5}], "columns": ["toy_score"]}
    plot_table(one, str(tmp_path / "one.png"))
    _check_png(tmp_path / "one.png")
    # no toy-judge column at all: the first column with a number is drawn on its own scale
    other = {"rows": [{"row": "(a)", "items": 10, "l1": 0.03}, {"row": "copy the source", "items": 10, "l1": 0.0}],
             "columns": ["l1"]}
    plot_table(other, tmp_path / "other.png")
    _check_png(tmp_path / "other.png")


def test_more_rows_make_a_taller_picture(tmp_path: Path) -> None:
    small = _table(True)
    big = {"rows": small["rows"][:1] * 8 + small["rows"][-1:], "columns": COLUMNS}
    plot_table(small, tmp_path / "small.png")
    plot_table(big, tmp_path / "big.png")
    assert _check_png(tmp_path / "big.png")[1] > _check_png(tmp_path / "small.png")[1]
