"""Fault injection: results must not be silently wrong when bytes on disk go bad or the disk fills.

Each section is one kind of fault; add new cases to the section of their fault (or a new section
at the end). Most cases work on small synthetic cache entries shaped like the ones the project
writes (``SPECS``); one end-to-end case corrupts a real job's cache and runs it again.

Sections:
  1. bit flips            — changed bytes of the same size: found by the manifest, recomputed
  2. truncation           — shorter files: found, recomputed
  3. garbled metadata     — key.json / manifest.json damaged, files missing or added,
                            entries without a manifest (older versions), unfinished entries
  4. reads after verify   — files that change or fail to load after done(): errors name the entry
  5. full / unwritable disk — writes name the path, the file system and the fix; no temp files
  6. the cache CLI        — python -m diffquant.cache verify / prune on a damaged cache
  7. end to end           — a corrupted real cache entry under diffquant.app.run
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import diffquant.cache as cache_module
from diffquant.cache import (
    CORRUPT,
    INCOMPLETE,
    OK,
    QUARANTINED,
    UNVERIFIABLE,
    CacheEntry,
    CacheReadError,
    CacheWriteError,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    main,
    scan,
)

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------- synthetic entries
# kind -> (key, {file: content}); .pt files are torch.save'd, .json files JSON-dumped. Shaped like
# what the project writes: calibration shards + index (calib/), a method result checkpoint (ptq/;
# quest/ and accuquant/ write the same file), FP-reference features (fp_samples/ and reference/).
g = torch.Generator().manual_seed(0)
SPECS = {
    "calib": (
        {"model": "ldm_digits", "n_samples": 8, "step_stride": 5},
        {
            "shard_00000.pt": {"sample": torch.randn(30, 4, 8, 8, generator=g), "_step": torch.arange(30)},
            "shard_00001.pt": {"sample": torch.randn(10, 4, 8, 8, generator=g), "_step": torch.arange(10)},
            "index.json": {
                "rows": 40,
                "keys": ["sample", "_step"],
                "steps": [0, 5],
                "guided": False,
                "shards": [{"file": "shard_00000.pt", "rows": 30}, {"file": "shard_00001.pt", "rows": 10}],
            },
        },
    ),
    "ptq": (
        {"model": "ldm_digits", "quant": "w8a8", "method": "ptq_minmax"},
        {
            "quantized_denoiser.pt": {
                "format": "diffquant-quant-v1",
                "quantizers": {f"down.{i}.delta": torch.rand(64, generator=g) for i in range(8)},
                "meta": {"calib_time_s": 1.5},
            },
        },
    ),
    "fp_samples": (
        {"backbone": "digits_cnn", "n": 40, "seed": 0},
        {
            "features.pt": {"features": torch.randn(40, 64, generator=g), "sample_s": 2.0},
        },
    ),
}
CASES = [(kind, name) for kind, (_, files) in SPECS.items() for name in [*files, "key.json", "manifest.json"]]


def _write(kind: str, folder: Path) -> None:
    for name, content in SPECS[kind][1].items():
        if name.endswith(".pt"):
            atomic_torch_save(content, folder / name)
        else:
            atomic_write_json(folder / name, content)


def _load(entry: CacheEntry) -> dict:
    return {
        name: entry.load(name) if name.endswith(".pt") else json.loads((entry.path / name).read_text())
        for name in SPECS[entry.path.parent.name][1]
    }


def use(root: Path, kind: str) -> tuple[CacheEntry, bool, dict]:
    """What every caller does: under the lock, compute the entry unless done(); then load it.
    Returns the entry, whether it was computed, and its content."""
    entry = CacheEntry(root, kind, SPECS[kind][0])
    computed = False
    with entry.lock():
        if not entry.done():
            with entry.writing() as tmp:
                _write(kind, tmp)
            computed = True
    return entry, computed, _load(entry)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def flip_bit(path: Path) -> None:
    """One flipped bit at two thirds of the file (in tensor data for the .pt files)."""
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10
    path.write_bytes(bytes(data))


def flip_64_bytes(path: Path) -> None:
    """64 bytes inverted from the middle, as the fault-injection probe did."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - 32)
    for i in range(start, min(len(data), start + 64)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def warnings_about(caplog, entry: CacheEntry) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and str(entry.path) in r.getMessage()
    ]


def check_found_and_recomputed(tmp_path, caplog, kind, name, fault, expect_aside=True):
    root = tmp_path / "cache"
    entry, computed, first = use(root, kind)
    assert computed and entry.done() and entry.verify().ok
    fault(entry.path / name)
    with caplog.at_level(logging.WARNING, logger="diffquant.cache"):
        again, computed, second = use(root, kind)
    assert computed, f"a damaged {name} was trusted"
    messages = warnings_about(caplog, entry)
    assert len(messages) == 1 and name in messages[0], messages
    assert same(first, second) and again.verify().ok
    aside = sorted(entry.path.parent.glob(f"{entry.digest}.corrupt-*"))
    assert len(aside) == (1 if expect_aside else 0)
    return messages[0], aside


# ---------------------------------------------------------------------------- 1. bit flips
@pytest.mark.parametrize("kind, name", CASES)
@pytest.mark.parametrize("fault", [flip_bit, flip_64_bytes])
def test_flipped_bytes_are_found_and_recomputed(kind, name, fault, tmp_path, caplog):
    message, aside = check_found_and_recomputed(tmp_path, caplog, kind, name, fault)
    assert "corrupt" in message and "prune --corrupt" in message
    assert (aside[0] / name).is_file()  # the damaged entry is kept aside for inspection


def test_a_flipped_bit_in_tensor_data_loads_silently_with_torch_alone(tmp_path):
    """Why entries carry a manifest: torch does not notice a changed value."""
    entry, _, first = use(tmp_path, "fp_samples")
    flip_bit(entry.path / "features.pt")
    changed = torch.load(entry.path / "features.pt")["features"]
    assert changed.shape == first["features.pt"]["features"].shape
    assert not torch.equal(changed, first["features.pt"]["features"])
    assert not entry.done()


# ---------------------------------------------------------------------------- 2. truncation
@pytest.mark.parametrize("kind, name", CASES)
def test_truncated_files_are_found_and_recomputed(kind, name, tmp_path, caplog):
    message, _ = check_found_and_recomputed(tmp_path, caplog, kind, name, truncate)
    if name != "manifest.json":
        assert "truncated" in message


def test_empty_file_is_found(tmp_path, caplog):
    check_found_and_recomputed(tmp_path, caplog, "ptq", "quantized_denoiser.pt", lambda p: p.write_bytes(b""))


# ---------------------------------------------------------------------------- 3. garbled metadata
def test_garbled_key_json_is_found(tmp_path, caplog):
    message, _ = check_found_and_recomputed(
        tmp_path, caplog, "ptq", "key.json", lambda p: p.write_text("{garbled")
    )
    assert "key.json" in message


def test_key_json_of_other_settings_is_found_even_with_a_matching_manifest(tmp_path, caplog):
    def swap_key(path: Path) -> None:  # a consistent entry, but of other settings
        atomic_write_json(path, {"model": "someone else's"})
        atomic_write_json(path.parent / "manifest.json", cache_module.build_manifest(path.parent))

    message, _ = check_found_and_recomputed(tmp_path, caplog, "ptq", "key.json", swap_key)
    assert "other settings" in message


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_missing_file_is_found(kind, tmp_path, caplog):
    name = next(iter(SPECS[kind][1]))
    message, _ = check_found_and_recomputed(tmp_path, caplog, kind, name, lambda p: p.unlink())
    assert "missing" in message


def test_added_file_is_found(tmp_path, caplog):
    message, _ = check_found_and_recomputed(
        tmp_path, caplog, "calib", "shard_00002.pt", lambda p: torch.save({"x": torch.zeros(3)}, p)
    )
    assert "added" in message


def test_garbled_manifest_is_found(tmp_path, caplog):
    message, _ = check_found_and_recomputed(
        tmp_path, caplog, "fp_samples", "manifest.json", lambda p: p.write_text("[]")
    )
    assert "manifest.json is garbled" in message


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_entry_without_manifest_is_never_trusted(kind, tmp_path, caplog):
    """Entries written before this change (key.json, no manifest.json) are recomputed, not used."""
    message, _ = check_found_and_recomputed(
        tmp_path, caplog, kind, "manifest.json", lambda p: p.unlink(), expect_aside=False
    )
    assert "cannot be checked" in message and "removed" in message


def test_unfinished_entry_is_recomputed(tmp_path, caplog):
    def strip(path: Path) -> None:  # as if killed while finishing it by hand
        (path.parent / "manifest.json").unlink()
        path.unlink()

    message, _ = check_found_and_recomputed(tmp_path, caplog, "calib", "key.json", strip, expect_aside=False)
    assert "unfinished" in message


def test_good_entries_are_used_without_warnings(tmp_path, caplog):
    for kind in SPECS:
        use(tmp_path, kind)
    with caplog.at_level(logging.WARNING, logger="diffquant.cache"):
        assert not any(use(tmp_path, kind)[1] for kind in SPECS)
    assert not caplog.records


# ---------------------------------------------------------------------------- 4. reads after verify
def _hint(entry: CacheEntry) -> str:
    return f"python -m diffquant.cache prune --path {entry.path}"


@pytest.mark.parametrize("fault", [truncate, lambda p: p.unlink()])
def test_file_changed_after_verification_names_the_entry(fault, tmp_path):
    entry = CacheEntry(tmp_path, "fp_samples", SPECS["fp_samples"][0])
    with entry.lock():
        if not entry.done():
            with entry.writing() as tmp:
                _write("fp_samples", tmp)
    assert entry.done()
    fault(entry.path / "features.pt")  # between done() and the load
    with pytest.raises(CacheReadError) as err:
        entry.load("features.pt")
    assert str(entry.path) in str(err.value) and _hint(entry) in str(err.value)
    assert "features.pt" in str(err.value)


def test_file_torch_cannot_read_names_the_entry_not_only_torch(tmp_path):
    """The manifest is fine with it (written so), but torch cannot read it."""
    entry = CacheEntry(tmp_path, "ptq", {"bad": True})
    with entry.lock():
        with entry.writing() as tmp:
            (tmp / "quantized_denoiser.pt").write_bytes(b"PK\x03\x04 not a zip archive" * 10)
    assert entry.done()
    from diffquant.quant.checkpoint import read_checkpoint

    for load in (
        lambda: entry.load("quantized_denoiser.pt"),
        lambda: read_checkpoint(entry.path / "quantized_denoiser.pt"),
    ):
        with pytest.raises(CacheReadError) as err:
            load()
        assert str(entry.path) in str(err.value) and _hint(entry) in str(err.value)


def test_calibration_stream_names_the_entry(tmp_path):
    from diffquant.calib.collect import CalibStream

    entry, _, _ = use(tmp_path, "calib")
    truncate(entry.path / "shard_00001.pt")
    with pytest.raises(CacheReadError, match="shard_00001.pt of cache entry"):
        list(CalibStream(entry.path).batches(8))


def test_files_outside_the_cache_load_as_before(tmp_path):
    with pytest.raises(FileNotFoundError):
        cache_module.load_torch(tmp_path / "nowhere.pt")
    torch.save({"a": 1}, tmp_path / "x.pt")
    assert cache_module.load_torch(tmp_path / "x.pt") == {"a": 1}


# ---------------------------------------------------------------------------- 5. full / unwritable disk
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp")


def _raise(exc):
    def f(*args, **kwargs):
        raise exc

    return f


@pytest.mark.parametrize("write", ["torch", "text"])
def test_enospc_names_the_path_and_the_fix(write, tmp_path, monkeypatch):
    target = tmp_path / "sub" / ("x.pt" if write == "torch" else "x.json")
    if write == "torch":
        monkeypatch.setattr(torch, "save", _raise(OSError(errno.ENOSPC, "No space left on device")))
    else:
        monkeypatch.setattr(os, "fsync", _raise(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CacheWriteError) as err:
        atomic_torch_save({"a": 1}, target) if write == "torch" else atomic_write_json(target, {"a": 1})
    msg = str(err.value)
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert "no space left on device on " in msg and str(target) in msg and "paths.cache_dir=" in msg
    assert not target.exists() and _leftovers(tmp_path) == []


def test_torch_iostream_error_is_explained(tmp_path, monkeypatch):
    """torch's own message ("basic_ios::clear: iostream error") carries no errno; the cause does."""

    def failing_save(obj, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CacheWriteError, match="no space left on device") as err:
        atomic_torch_save({"a": 1}, tmp_path / "x.pt")
    assert str(tmp_path / "x.pt") in str(err.value) and _leftovers(tmp_path) == []
    # without a cause and with room on the disk: still the path, and torch's words
    monkeypatch.setattr(torch, "save", _raise(RuntimeError("[enforce fail] unexpected pos 576 vs 534")))
    with pytest.raises(CacheWriteError, match="unexpected pos") as err:
        atomic_torch_save({"a": 1}, tmp_path / "y.pt")
    assert str(tmp_path / "y.pt") in str(err.value) and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "code, needle", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")]
)
def test_unwritable_folder_names_the_path(code, needle, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "mkstemp", _raise(OSError(code, os.strerror(code))))
    with pytest.raises(CacheWriteError, match=needle) as err:
        atomic_write_text(tmp_path / "x.txt", "hello")
    assert err.value.errno == code and str(tmp_path / "x.txt") in str(err.value)


def test_other_errors_pass_through_and_leave_nothing(tmp_path):
    with pytest.raises(Exception) as err:
        atomic_torch_save({"f": lambda: 0}, tmp_path / "x.pt")  # not picklable: a bug, not the disk
    assert not isinstance(err.value, CacheWriteError) and _leftovers(tmp_path) == []


def test_full_disk_while_writing_an_entry_leaves_no_entry(tmp_path, monkeypatch):
    entry = CacheEntry(tmp_path, "ptq", SPECS["ptq"][0])
    monkeypatch.setattr(torch, "save", _raise(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CacheWriteError, match="no space left") as err:
        with entry.lock():
            with entry.writing() as tmp:
                _write("ptq", tmp)
    assert f"quantized_denoiser.pt of cache entry {entry.path}" in str(err.value)
    assert not entry.done() and _leftovers(tmp_path) == []
    assert [p.name for p in entry.path.parent.iterdir()] == [f"{entry.digest}.lock"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MB tmpfs (needs root and mount permission; skipped otherwise); unmounted after."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_disk(small_tmpfs):
    big = {"x": torch.zeros(1_000_000)}  # 4 MB on a 1 MB file system
    with pytest.raises(CacheWriteError) as err:
        atomic_torch_save(big, small_tmpfs / "big.pt")
    msg = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert f"no space left on device on {small_tmpfs}" in msg and str(small_tmpfs / "big.pt") in msg
    assert os.listdir(small_tmpfs) == []

    entry = CacheEntry(small_tmpfs, "calib", SPECS["calib"][0])
    with pytest.raises(CacheWriteError, match="no space left on device"):
        with entry.lock():
            with entry.writing() as tmp:
                atomic_torch_save(big, tmp / "shard_00000.pt")
    assert not entry.done() and os.listdir(entry.path.parent) == [f"{entry.digest}.lock"]


def test_real_read_only_file_system(small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(CacheWriteError, match=f"read-only file system on {small_tmpfs}") as err:
        atomic_write_json(small_tmpfs / "x.json", {"a": 1})
    assert err.value.errno == errno.EROFS


# ---------------------------------------------------------------------------- 6. the cache CLI
@pytest.fixture
def damaged_cache(tmp_path):
    """A cache with one entry of each status: calib ok, ptq corrupt (flipped bytes), fp_samples
    unverifiable (no manifest), an unfinished computation's progress, an interrupted write."""
    root = tmp_path / "cache"
    entries = {kind: use(root, kind)[0] for kind in SPECS}
    flip_64_bytes(entries["ptq"].path / "quantized_denoiser.pt")
    (entries["fp_samples"].path / "manifest.json").unlink()
    partial = CacheEntry(root, "calib", {"other": 1}).partial_dir()
    (partial / "batch_0000000_20.pt").write_bytes(b"x" * 100)
    interrupted = root / "ptq" / f".{'0' * 16}.abc123"
    interrupted.mkdir()
    (interrupted / "quantized_denoiser.pt").write_bytes(b"x" * 50)
    return root, entries, partial, interrupted


def test_cli_verify_lists_every_status(damaged_cache, capsys):
    root, entries, partial, interrupted = damaged_cache
    assert main(["verify", "--cache-dir", str(root)]) == 1  # a corrupt entry
    lines = capsys.readouterr().out.splitlines()
    status = {line.split()[1]: line.split()[0] for line in lines[:-2]}
    assert status == {
        f"calib/{entries['calib'].digest}": OK,
        f"calib/{partial.name}": INCOMPLETE,
        f"fp_samples/{entries['fp_samples'].digest}": UNVERIFIABLE,
        f"ptq/{interrupted.name}": INCOMPLETE,
        f"ptq/{entries['ptq'].digest}": CORRUPT,
    }
    assert "quantized_denoiser.pt" in next(line for line in lines if line.startswith(CORRUPT))
    assert "5 folders" in lines[-2] and "prune --corrupt" in lines[-1]
    assert entries["ptq"].path.is_dir()  # verify changes nothing


def test_cli_prune(damaged_cache, capsys):
    root, entries, partial, interrupted = damaged_cache
    size = sum(p.stat().st_size for p in entries["ptq"].path.rglob("*"))
    assert main(["prune", "--cache-dir", str(root), "--corrupt", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove corrupt" in out and "would remove 1 folder, " in out and f"({size} bytes)" in out
    assert entries["ptq"].path.is_dir()

    assert main(["prune", "--cache-dir", str(root), "--corrupt"]) == 0
    assert "removed 1 folder, " in capsys.readouterr().out and not entries["ptq"].path.exists()
    assert main(["prune", "--cache-dir", str(root), "--incomplete"]) == 0
    assert "removed 2 folders" in capsys.readouterr().out
    assert not partial.exists() and not interrupted.exists()
    assert main(["verify", "--cache-dir", str(root)]) == 0
    assert main(["prune", "--cache-dir", str(root), "--unverifiable"]) == 0
    assert not entries["fp_samples"].path.exists() and entries["calib"].path.is_dir()

    old = time.time() - 3 * 86400
    os.utime(entries["calib"].path, (old, old))
    assert main(["prune", "--cache-dir", str(root), "--older-than", "5"]) == 0
    assert entries["calib"].path.is_dir()
    assert main(["prune", "--cache-dir", str(root), "--older-than", "2"]) == 0
    assert not entries["calib"].path.exists()


def test_cli_prune_path_and_all(damaged_cache, capsys):
    root, entries, partial, interrupted = damaged_cache
    assert main(["prune", "--path", str(entries["calib"].path / "shard_00000.pt")]) == 0
    assert not entries["calib"].path.exists() and entries["ptq"].path.is_dir()
    assert main(["prune", "--cache-dir", str(root), "--all"]) == 0
    assert "removed 4 folders" in capsys.readouterr().out
    assert all(p.suffix == ".lock" for p in root.rglob("*") if p.is_file())
    assert main(["prune", "--cache-dir", str(root)]) == 2  # says what to remove


def test_corrupt_entry_moved_aside_is_listed_and_pruned(tmp_path, capsys):
    entry, _, _ = use(tmp_path, "ptq")
    truncate(entry.path / "key.json")
    assert not entry.done()
    assert [i.status for i in scan(tmp_path)] == [QUARANTINED]
    assert main(["verify", "--cache-dir", str(tmp_path)]) == 0
    assert main(["prune", "--cache-dir", str(tmp_path), "--corrupt"]) == 0
    assert scan(tmp_path) == []


LOCK_HOLDER = """
import sys, time
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(30)
"""


def test_cli_never_removes_an_entry_a_job_holds(damaged_cache, capsys):
    root, entries, partial, interrupted = damaged_cache
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(entries["ptq"].path) + ".lock"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["prune", "--cache-dir", str(root), "--all"]) == 0
        assert "skipped busy" in capsys.readouterr().out and entries["ptq"].path.is_dir()
    finally:
        holder.kill()
        holder.wait()


def test_cli_runs_as_a_module(damaged_cache):
    root = damaged_cache[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "diffquant.cache", "verify", "--cache-dir", str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1 and "corrupt" in proc.stdout, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "diffquant.cache", "verify"],
        cwd=root.parent,
        capture_output=True,
        text=True,
        env={**env, "DIFFQUANT_ROOT": str(root.parent)},
        timeout=60,
    )
    assert proc.returncode == 1 and f"{root}:" in proc.stdout  # default: $DIFFQUANT_ROOT/cache


# ---------------------------------------------------------------------------- 7. end to end
E2E = [
    "evaluator.n_samples=20",
    "evaluator.batch_size=20",
    "logger=none",
    "quant=w8a8",
    "method=ptq_minmax",
    "method.calib.n_samples=4",
    "method.calib.step_stride=5",
    "method.act_init_rows=32",
]


@pytest.mark.usefixtures("one_thread")
def test_corrupted_cache_of_a_real_run_is_recomputed_with_the_same_metrics(make_cfg, tmp_path, caplog):
    from diffquant.app import run

    first = run(make_cfg(E2E, name="first"))
    cache = tmp_path / "cache"
    checkpoint = next(cache.glob("ptq_minmax/*/quantized_denoiser.pt"))
    features = next(cache.glob("fp_samples/*/features.pt"))
    flip_64_bytes(checkpoint)
    truncate(features)
    with caplog.at_level(logging.WARNING, logger="diffquant.cache"):
        second = run(make_cfg(E2E, name="second"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for damaged in (checkpoint, features):
        assert any(str(damaged.parent) in m and damaged.name in m for m in warned), warned
    assert first["ptq_minmax_cached"] is False and second["ptq_minmax_cached"] is False  # recomputed
    for key in ("fid", "inception_score", "fid_to_fp"):
        assert second[key] == first[key], key
    assert main(["verify", "--cache-dir", str(cache)]) == 0


# ---------------------------------------------------------------------------- 8. model weights
def zoo_copy(tmp_path: Path) -> Path:
    """A copy of the embedded ldm_digits folder that a test may damage."""
    import shutil

    from diffquant.models.loading import ZOO_DIR

    dst = tmp_path / "ldm_digits_copy"
    shutil.copytree(ZOO_DIR / "ldm_digits", dst)
    return dst


def poke_weight(folder: Path, value: float) -> str:
    """Set one denoiser weight of ``folder`` to ``value``; returns the parameter's name."""
    from safetensors.torch import load_file, save_file

    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    name = "conv_in.weight"
    state[name].view(-1)[0] = value
    save_file(state, path)
    return name


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_fails_at_load_naming_the_parameter(value, make_cfg, tmp_path):
    from diffquant.app import run
    from diffquant.models.loading import NonFiniteWeightsError

    folder = zoo_copy(tmp_path)
    name = poke_weight(folder, value)
    cfg = make_cfg([*E2E, f"model.pretrained={folder}"])
    with pytest.raises(NonFiniteWeightsError, match=f"denoiser parameter '{name}'"):
        run(cfg)
    cache = Path(cfg.paths.cache_dir)
    assert not any(cache.glob("fp_samples/*")) and not any(cache.glob("calib/*"))  # before any work


@pytest.mark.usefixtures("one_thread")
def test_weights_changed_in_place_get_a_fresh_fp_reference(make_cfg, tmp_path):
    """The FP reference is keyed by the weights, not the path: retraining (here: changing one
    weight) at the same path never reuses the old model's FP samples."""
    from diffquant.app import run

    folder = zoo_copy(tmp_path)
    run(make_cfg([*E2E, f"model.pretrained={folder}"], name="first"))
    poke_weight(folder, 0.5)
    run(make_cfg([*E2E, f"model.pretrained={folder}"], name="second"))
    cache = tmp_path / "cache"
    assert len(list(cache.glob("fp_samples/*/features.pt"))) == 2
    assert len(list(cache.glob("ptq_minmax/*/quantized_denoiser.pt"))) == 2


def test_corrupt_weights_are_reported_as_corrupt_not_missing(make_cfg, tmp_path):
    from diffquant.models.loading import CorruptWeightsError, build_model

    folder = zoo_copy(tmp_path)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated download
    cfg = make_cfg([f"model.pretrained={folder}"])
    with pytest.raises(CorruptWeightsError, match="exist but cannot be read") as err:
        build_model(cfg.model)
    assert "python -m diffquant.zoo.train ldm_digits" in str(err.value)


def test_non_finite_features_are_never_cached_and_non_finite_metrics_never_written(tmp_path):
    from diffquant.app import check_finite_features, write_metrics

    with pytest.raises(FloatingPointError, match="1 of 3 samples"):
        check_finite_features(torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [2.0, 3.0]]), "FP reference")
    with pytest.raises(FloatingPointError, match="fid_to_fp"):
        write_metrics(tmp_path, {"fid": 0.3, "fid_to_fp": float("nan")})
    assert not (tmp_path / "metrics.json").exists()
    write_metrics(tmp_path, {"fid": 0.3, "fid_to_fp": None})
    assert json.loads((tmp_path / "metrics.json").read_text())["fid"] == 0.3
