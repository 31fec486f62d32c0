"""``diffquant.bench.paper_size``'s tracer: per-unit peaks of a child's memory and disk, and the
slope that tells growth from a bounded run."""

import sys
import textwrap

import pytest

from diffquant.bench.paper_size import slope, summarize, traced_run

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    folder, keep = Path(sys.argv[1]), sys.argv[2] == "keep"
    held = []
    for k in range(1, 5):
        block = bytearray(40 * 2**20)          # 40 MB touched: resident
        block[::4096] = b"x" * len(block[::4096])
        (folder / f"unit{k}.bin").write_bytes(b"0" * 8 * 2**20)
        time.sleep(0.4)
        if keep:
            held.append(block)
        else:
            del block
            (folder / f"unit{k}.bin").unlink()
        print(f"[{k}/4] unit{k} resnet w_loss=1 a_loss=- (0.4s, capture 0.1s)", flush=True)
    time.sleep(0.2)
    """
)


@pytest.mark.parametrize("keep", [True, False])
def test_tracer_tells_growth_from_a_bounded_run(tmp_path, keep):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    folder = tmp_path / "disk"
    folder.mkdir()
    cmd = [sys.executable, str(script), str(folder), "keep" if keep else "free"]
    traced = traced_run(cmd, [folder], every=0.05, log_file=tmp_path / "log")
    assert traced["rc"] == 0
    assert [u[1:] for u in traced["units"]] == [(k, 4, f"unit{k}", 0.4) for k in range(1, 5)]
    summary = summarize(traced["samples"], traced["units"])
    units, one_pass = summary["units"], summary["passes"]["1"]
    rss_slope, disk_slope = one_pass["rss_slope_mb_per_unit"], one_pass["disk_slope_mb_per_unit"]
    if keep:  # 40 MB and 8 MB more held after every unit
        assert 30 < rss_slope < 50 and 6 < disk_slope < 10
    else:
        assert abs(rss_slope) < 10 and abs(disk_slope) < 2
        assert all(u["peak_disk_mb"] >= 7.9 for u in units)  # each unit's file was seen


def test_slope():
    assert slope([5.0]) is None
    assert slope([1.0, 3.0, 5.0]) == pytest.approx(2.0)
    assert slope([4.0, 4.0, 4.0, 4.0]) == 0.0


def test_passes_restart_the_windows():
    """The activation stage's pass (unit numbers restart at 1) is summarized on its own, and what
    happens between the passes (here a 900 MB spike) falls in no unit's window."""
    mb = 2**20
    samples = [(t, (900 if 4 < t < 6 else 100 + t) * mb, 0) for t in [x * 0.5 for x in range(21)]]
    lines = [(1.0, 1, 2, "a", 1.0), (3.0, 2, 2, "b", 2.0), (7.0, 1, 2, "a", 1.0), (10.0, 2, 2, "b", 3.0)]
    summary = summarize(samples, lines)
    assert [(u["pass"], u["unit"]) for u in summary["units"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [u["peak_rss_mb"] for u in summary["units"]] == [101.0, 103.0, 107.0, 110.0]
    assert summary["peak_rss_mb"] == 900.0 and set(summary["passes"]) == {"1", "2"}
