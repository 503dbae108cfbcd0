"""Result tables: one CSV writer and one markdown / plain-text renderer for every table."""

import csv
import math

from scse_jax import tables


def test_markdown_rows_and_separator():
    text = tables.render(("model", "Dice"), [["unet", "0.810"], ["scse", "0.822"]])
    assert text == "| model | Dice |\n| --- | --- |\n| unet | 0.810 |\n| scse | 0.822 |\n"


def test_plain_text_aligns_the_first_column_left_and_the_others_right():
    text = tables.render(("organ", "dice"), [["right_kidney", "0.887"], ["mean", "nan"]], markdown=False)
    assert text.splitlines() == ["organ          dice", "right_kidney  0.887", "mean            nan"]


def test_format_value_three_decimals_and_non_finite_values():
    assert [tables.format_value(v) for v in (0.97841, 14, math.inf, math.nan)] == ["0.978", "14.000", "inf", "nan"]


def test_write_csv_takes_every_key_in_first_met_order_or_the_named_columns(tmp_path):
    rows = [{"patient": "1", "dice": 0.5}, {"patient": "2", "dice": math.inf, "postprocess": "none"}]
    tables.write_csv(rows, tmp_path / "all.csv")
    with (tmp_path / "all.csv").open(newline="") as stream:
        read = list(csv.DictReader(stream))
    assert list(read[0]) == ["patient", "dice", "postprocess"]
    assert read[0]["postprocess"] == "" and math.isinf(float(read[1]["dice"]))

    tables.write_csv(rows, tmp_path / "sub" / "named.csv", ("patient", "organ"))
    with (tmp_path / "sub" / "named.csv").open(newline="") as stream:
        assert list(csv.DictReader(stream)) == [{"patient": "1", "organ": ""}, {"patient": "2", "organ": ""}]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["all.csv", "named.csv", "sub"]


def test_organ_rows():
    rows = [{"organ": "liver", "v": 1}, {"organ": "spleen", "v": 2}, {"organ": "liver", "v": 3}]
    assert [row["v"] for row in tables.organ_rows(rows, "liver")] == [1, 3]
