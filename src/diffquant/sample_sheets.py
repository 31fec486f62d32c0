"""Sample sheets: one picture per model and bit-width, with a row of the same samples per method.

Every job saves the first ``evaluator.grid_size`` images it sampled as ``samples.pt`` (uint8,
``(N, C, H, W)``, next to ``samples.png``). Sample ``i`` starts from the same noise in every job
of one evaluation seed (:mod:`diffquant.eval.sampling`), so column ``i`` of a sheet shows what each
method makes of one starting point. A sheet has the model's FP row on top, then one row per method
in table order, all at one evaluation seed and one calibration seed (the lowest the sweep has).

``python -m diffquant.tables <sweep dir>`` and the sweeps' table callback write them next to the
table as ``samples_<model>_<WxAy>.png``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from diffquant.eval.fp_images import to_uint8
from diffquant.tables import bits_label, calib_seed_of, method_label_of

SAMPLES_FILE = "samples.pt"
SHEET_COLUMNS = 12
_PAD = 2
_LABEL_PX = 96  # left margin for the row labels


def save_samples(images: torch.Tensor, run_dir: Path | str) -> Path:
    """Save a job's grid images ``(N, C, H, W)`` in [0, 1] as ``<run_dir>/samples.pt`` (uint8)."""
    from diffquant.cache import atomic_torch_save

    path = Path(run_dir) / SAMPLES_FILE
    atomic_torch_save(to_uint8(images.detach()).cpu(), path)
    return path


def load_samples(run_dir: Path | str) -> Optional[torch.Tensor]:
    """A job's saved grid images (uint8 ``(N, C, H, W)``); None when it has none or they are
    unreadable (a job written before samples were saved, a truncated file)."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return None
    try:
        images = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable file is a missing row, not a failed table
        return None
    ok = isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4
    return images if ok else None


@dataclass
class SheetRow:
    """One row of a sheet: its label and its images (uint8 ``(n, C, H, W)``)."""

    label: str
    images: torch.Tensor


def collect_sheets(
    results: Sequence[dict[str, Any]], method_order: Sequence[str] = (), columns: int = SHEET_COLUMNS
) -> dict[tuple[str, str], list[SheetRow]]:
    """Group finished jobs (``read_results`` dicts, with ``_dir``) into sheets keyed by (model,
    bits): the FP row first, then one row per method label in ``method_order`` (labels not in it
    after, sorted). Per model, only jobs at its lowest evaluation seed and lowest calibration seed
    are used; jobs without saved samples are left out, as are sheets without a quantized row."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for m in results:
        by_model.setdefault(str(m["model"]), []).append(m)
    sheets: dict[tuple[str, str], list[SheetRow]] = {}
    for model, jobs in sorted(by_model.items()):
        seed = min(int(m.get("seed") or 0) for m in jobs)
        at_seed = [m for m in jobs if int(m.get("seed") or 0) == seed]
        quantized = [m for m in at_seed if m["method"] != "fp"]
        if not quantized:
            continue
        calib = min(calib_seed_of(m) for m in quantized)
        fp = next((m for m in at_seed if m["method"] == "fp"), None)
        fp_images = load_samples(fp["_dir"]) if fp is not None else None
        rows_by_bits: dict[str, dict[str, torch.Tensor]] = {}
        for m in quantized:
            if calib_seed_of(m) != calib:
                continue
            images = load_samples(m["_dir"])
            if images is not None:
                bits = bits_label(m.get("weight_bits"), m.get("act_bits"))
                rows_by_bits.setdefault(bits, {}).setdefault(method_label_of(m), images)
        for bits, rows in rows_by_bits.items():
            order = [x for x in method_order if x in rows] + sorted(x for x in rows if x not in method_order)
            sheet = [SheetRow("fp", fp_images[:columns])] if fp_images is not None else []
            sheet += [SheetRow(label, rows[label][:columns]) for label in order]
            sheets[(model, bits)] = sheet
    return sheets


def render_sheet(rows: Sequence[SheetRow], title: str = "") -> bytes:
    """A PNG of ``rows``: a label on the left, the images in a line with 2-px gaps, upscaled to
    at least 48 px per image so that digits stay legible; images of a row beyond the shortest
    row are cut so that columns line up."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("a sample sheet needs at least one row")
    n = min(len(r.images) for r in rows)
    _, c, h, w = rows[0].images.shape
    if any(r.images.shape[1:] != rows[0].images.shape[1:] for r in rows):
        raise ValueError(f"sample sheet {title!r}: rows have images of different shapes")
    scale = max(1, -(-48 // max(h, w)))
    hh, ww = h * scale, w * scale
    top = 16 if title else 0
    height = top + _PAD + len(rows) * (hh + _PAD)
    width = _LABEL_PX + n * (ww + _PAD) + _PAD
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 2), title, fill="black")
    for i, row in enumerate(rows):
        y = top + _PAD + i * (hh + _PAD)
        draw.text((4, y + hh // 2 - 5), row.label, fill="black")
        for k in range(n):
            arr = row.images[k].permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr[..., 0] if c == 1 else arr).convert("RGB")
            tile = tile.resize((ww, hh), Image.NEAREST)
            sheet.paste(tile, (_LABEL_PX + k * (ww + _PAD), y))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def sheet_name(model: str, bits: str) -> str:
    return f"samples_{model}_{bits}.png"


def write_sample_sheets(
    results: Sequence[dict[str, Any]],
    out_dir: Path | str,
    method_order: Iterable[str] = (),
    columns: int = SHEET_COLUMNS,
) -> list[Path]:
    """Write one ``samples_<model>_<bits>.png`` per sheet of ``results`` into ``out_dir``;
    returns the paths written."""
    from diffquant.cache import atomic_write_bytes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (model, bits), rows in collect_sheets(results, list(method_order), columns).items():
        seeds = {int(m.get("seed") or 0) for m in results if m["model"] == model}
        png = render_sheet(rows, title=f"{model} {bits} (eval seed {min(seeds)})")
        path = out_dir / sheet_name(model, bits)
        atomic_write_bytes(path, png)
        written.append(path)
    return written


def sheet_array(png: bytes) -> np.ndarray:
    """A written sheet as an array ``(H, W, 3)`` (for tests and notebooks)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
