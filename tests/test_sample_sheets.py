"""Sample sheets: which jobs make the rows of a sheet, in what order, and what the PNG holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffquant.sample_sheets import (
    collect_sheets,
    load_samples,
    render_sheet,
    save_samples,
    sheet_array,
    write_sample_sheets,
)
from diffquant.tables import read_results


def _job(root: Path, name: str, value: float, **metrics) -> dict:
    """A finished job folder: metrics.json and a saved grid of 4 constant 1×8×8 images."""
    d = root / name
    d.mkdir(parents=True)
    m = {"model": "ldm_digits", "seed": 0, **metrics}
    (d / "metrics.json").write_text(json.dumps(m))
    save_samples(torch.full((4, 1, 8, 8), value), d)
    return m


@pytest.fixture
def sweep(tmp_path):
    _job(tmp_path, "0", 1.0, method="fp", weight_bits=32, act_bits=32)
    _job(tmp_path, "1", 0.2, method="ptq", weight_bits=4, act_bits=4, calib_seed=0)
    _job(tmp_path, "2", 0.4, method="quest", weight_bits=4, act_bits=4, calib_seed=0)
    _job(tmp_path, "3", 0.6, method="ptq", weight_bits=4, act_bits=4, calib_seed=1)  # other calib seed
    _job(tmp_path, "4", 0.8, method="ptq", weight_bits=4, act_bits=4, calib_seed=0, seed=1)  # other eval seed
    _job(tmp_path, "5", 0.0, method="ptq", weight_bits=8, act_bits=8, calib_seed=0)
    return tmp_path


def test_samples_round_trip_as_uint8(tmp_path):
    images = torch.rand(3, 1, 8, 8)
    save_samples(images, tmp_path)
    back = load_samples(tmp_path)
    assert back.dtype == torch.uint8 and torch.equal(back, (images * 255).round().to(torch.uint8))
    (tmp_path / "samples.pt").write_bytes(b"truncated")
    assert load_samples(tmp_path) is None and load_samples(tmp_path / "nowhere") is None


def test_sheets_have_fp_on_top_then_methods_in_table_order_at_one_seed(sweep):
    sheets = collect_sheets(read_results(sweep), method_order=["quest", "ptq"], columns=3)
    assert sorted(sheets) == [("ldm_digits", "W4A4"), ("ldm_digits", "W8A8")]
    rows = sheets[("ldm_digits", "W4A4")]
    assert [r.label for r in rows] == ["fp", "quest", "ptq"]
    # calibration seed 0 and evaluation seed 0 only: ptq's row is job 1 (0.2), not 3 or 4
    assert [int(r.images[0, 0, 0, 0]) for r in rows] == [255, 102, 51]
    assert all(r.images.shape == (3, 1, 8, 8) for r in rows)


def test_rendered_sheet_holds_each_row_upscaled(sweep):
    rows = collect_sheets(read_results(sweep), ["ptq", "quest"], columns=4)[("ldm_digits", "W4A4")]
    arr = sheet_array(render_sheet(rows))
    scale = 6  # 8-px images upscaled to 48 px
    assert arr.shape == (2 + 3 * (8 * scale + 2), 96 + 4 * (8 * scale + 2) + 2, 3)
    for i, want in enumerate([255, 51, 102]):  # fp, ptq, quest
        y = 2 + i * (8 * scale + 2)
        tile = arr[y : y + 8 * scale, 96 : 96 + 8 * scale]
        assert np.all(tile == want), (i, np.unique(tile))


def test_write_sample_sheets_names_files_by_model_and_bits(sweep, tmp_path):
    out = tmp_path / "tables"
    paths = write_sample_sheets(read_results(sweep), out)
    assert sorted(p.name for p in paths) == ["samples_ldm_digits_W4A4.png", "samples_ldm_digits_W8A8.png"]
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths)


def test_rows_of_different_image_shapes_are_refused():
    from diffquant.sample_sheets import SheetRow

    rows = [
        SheetRow("fp", torch.zeros(2, 1, 8, 8, dtype=torch.uint8)),
        SheetRow("ptq", torch.zeros(2, 3, 8, 8, dtype=torch.uint8)),
    ]
    with pytest.raises(ValueError, match="different shapes"):
        render_sheet(rows, "x")
