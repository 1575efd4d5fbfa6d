"""The CLI's defaults and the demo's table (no model needed)."""

import pytest

from freespec.cli import build_parser
from freespec.demo import format_table


def test_demo_defaults_to_the_device_drafter_and_refuses_plain():
    args = build_parser().parse_args(["demo"])
    assert args.drafter == "auto" and args.tree == "auto"
    assert build_parser().parse_args(["demo", "--drafter", "suffix"]).drafter == "suffix"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--drafter", "none"])


def test_demo_table_totals():
    rows = [
        {"id": "a", "category": "qa", "tokens": 10, "plain_s": 1.0, "tr_s": 0.5, "plain_tps": 10.0, "tr_tps": 20.0,
         "mat": 2.0, "identical": True},
        {"id": "b", "category": "qa", "tokens": 30, "plain_s": 3.0, "tr_s": 3.0, "plain_tps": 10.0, "tr_tps": 10.0,
         "mat": 1.0, "identical": False},
    ]
    out = format_table(rows).splitlines()
    assert "spec tok/s" in out[0]
    overall = out[-1]
    assert "1.14x" in overall  # 40 tokens in 4 s vs 3.5 s: totals, not a mean of ratios
    assert "1/2" in overall and "NO" in out[3]


def test_calibrate_rounds_must_be_a_positive_number(capsys):
    assert build_parser().parse_args(["calibrate", "--rounds", "60"]).rounds == 60
    assert build_parser().parse_args(["calibrate"]).rounds is None
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["calibrate", "--rounds", bad])
        assert "--rounds" in capsys.readouterr().err
