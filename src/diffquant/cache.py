"""Work that lasts: a cache keyed by the settings that produced each entry, and atomic writes.

Every expensive intermediate (calibration trajectories, a baseline PTQ result, the FP model's
reference features) lives at ``<cache_dir>/<kind>/<hash of its settings>/``. An entry is written
under a temporary name and renamed when complete, under a file lock, so that concurrent jobs of a
sweep compute it once and a killed job never leaves a half-written entry behind.

    entry = CacheEntry(ctx.cache_dir, "calib", {"model": ..., "steps": ...})
    with entry.lock():
        if not entry.done():
            with entry.writing() as tmp:      # a fresh folder; renamed to entry.path on success
                torch.save(data, tmp / "data.pt")
    data = torch.load(entry.path / "data.pt")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock


def stable_hash(obj: Any, length: int = 16) -> str:
    """A hex digest of a JSON-able object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    """``torch.save`` through a temporary file and a rename."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class CacheEntry:
    """One cache folder ``<root>/<kind>/<hash(key)>``; ``key`` is saved beside it as ``key.json``."""

    def __init__(self, root: Path | str, kind: str, key: dict[str, Any]) -> None:
        self.key = key
        self.digest = stable_hash(key)
        self.path = Path(root) / kind / self.digest
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def done(self) -> bool:
        return (self.path / "key.json").exists()

    @contextlib.contextmanager
    def lock(self, timeout: float = -1) -> Iterator[None]:
        """Hold the entry's lock (blocks while another process computes it)."""
        with FileLock(str(self.path) + ".lock", timeout=timeout):
            yield

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A temporary folder to fill; renamed to :attr:`path` (with ``key.json``) on success."""
        tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.digest}."))
        try:
            yield tmp
            atomic_write_json(tmp / "key.json", self.key)
            if self.path.exists():
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def partial_dir(self) -> Path:
        """A folder for resumable progress of this entry (kept across kills, removed with it)."""
        p = self.path.parent / f"{self.digest}.partial"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def clear_partial(self) -> None:
        shutil.rmtree(self.path.parent / f"{self.digest}.partial", ignore_errors=True)
