"""Work that lasts: a cache keyed by the settings that produced each entry, verified when read.

Every expensive intermediate (calibration trajectories, a baseline PTQ result, the FP model's
reference features) lives at ``<cache_dir>/<kind>/<hash of its settings>/``. An entry is written
under a temporary name and renamed when complete, under a file lock, so that concurrent jobs of a
sweep compute it once and a killed job never leaves a half-written entry behind.

    entry = CacheEntry(ctx.cache_dir, "calib", {"model": ..., "steps": ...})
    with entry.lock():
        if not entry.done():                  # verifies the entry; a damaged one is set aside
            with entry.writing() as tmp:      # a fresh folder; renamed to entry.path on success
                torch.save(data, tmp / "data.pt")
    data = entry.load("data.pt")              # torch.load that names the entry when it fails

**What the keys name.** An entry is reused only where recomputing it would give the same bits,
so a key holds every setting that produced the entry *and* the numerics that change float
results (:func:`diffquant.numerics.numerics_identity`: device type, CPU thread count, the CPU
capability torch dispatches on, the torch version, on CUDA the device name and cuDNN version;
a rerun on another machine moved calibrated results while the FP row stayed exact). The
numerics enter through the FP model's identity (:func:`diffquant.calib.collect.model_identity`)
in the keys of every *computed* result:

* ``calib/`` — calibration sets (:func:`~diffquant.calib.collect.calib_cache_key`: model
  identity, calibration settings with the derived ``calib.seed``);
* ``<method>/`` — method results, PTQ bases included
  (:func:`~diffquant.methods.result_cache.method_result_key`: model identity, quant config,
  method config with every derived seed, version), and QuEST's ``quest_sensitivity/`` sweep;
* ``fp_samples/`` — the FP model's features for ``fid_to_fp`` (model identity, seed, chunks).

Seeds: the method config in a key holds the seeds that ``calib_seed`` derives
(:mod:`diffquant.seeds`), so two calibration seeds never share an entry, and ``calib_seed=0``,
which derives every seed as configured, adds nothing to a key. Not keyed by the numerics:
``reference/`` — the real images' backbone features, one target for every row of a table; the
shard merge (:mod:`diffquant.shards`) reuses them on whatever machine it runs, instead of
recomputing e.g. 50k Inception features on the launching node's CPU, and a backbone forward of
fixed images differs across machines in the last bits only, unlike a sampled trajectory or an
optimisation, which amplify such differences. Entries written under an older key (before the
CPU capability and torch version were named) are not found and are computed again.

**Verification.** :meth:`CacheEntry.writing` records ``manifest.json`` beside ``key.json``: the
size and SHA-256 of every file of the entry (recursively). :meth:`CacheEntry.done` re-hashes all
files against it on every call (once per job and entry: hashing runs at about the speed of
``torch.load``). An entry whose files differ (flipped bits, truncation, a missing, extra or garbled
file, including ``key.json``) is moved aside to ``<hash>.corrupt-<time>``; one without a manifest
(written before entries were verified) or without ``key.json`` is removed; either way with a
WARNING naming the entry and the file, and ``done()`` is False so the caller recomputes it.
:func:`load_torch` / :meth:`CacheEntry.load` check the file's size against the manifest and turn
any failure to read into a :class:`CacheReadError` naming the entry and how to remove it.

**Writes.** :func:`atomic_torch_save` and :func:`atomic_write_text` write a temporary file in the
destination folder and rename it; on failure the temporary file is removed and I/O
errors (ENOSPC, EROFS, EACCES, torch's "iostream error"/"unexpected pos") become a
:class:`CacheWriteError` (an ``OSError`` with the original errno) naming the path, the file system
and the fix.

**Command line.** ``python -m diffquant.cache verify [--cache-dir DIR]`` lists every entry as
ok / corrupt / unverifiable / incomplete (exit status 1 if any is corrupt);
``python -m diffquant.cache prune [--cache-dir DIR] (--corrupt | --unverifiable | --incomplete |
--all | --older-than DAYS | --path P) [--dry-run]`` removes entries (never one a running job holds
locked). The default cache is ``$DIFFQUANT_ROOT/cache`` or ``./cache``, as ``paths.cache_dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional

from filelock import FileLock, Timeout

log = logging.getLogger("diffquant.cache")  # also when run as ``python -m diffquant.cache``

KEY_FILE = "key.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "diffquant-cache-manifest-v1"
HASH = "sha256"

# Statuses of a cache folder (:func:`verify_entry`, ``python -m diffquant.cache verify``).
OK = "ok"
CORRUPT = "corrupt"  # files differ from the manifest written with them
UNVERIFIABLE = "unverifiable"  # no manifest: written before entries were verified
INCOMPLETE = "incomplete"  # unfinished: no key.json, resumable progress, a temporary folder
MISSING = "missing"
QUARANTINED = "moved-aside"  # a corrupt entry that done() moved aside (<hash>.corrupt-<time>)
BUSY = "busy"  # locked by a running job
UNKNOWN = "unknown"  # not made by CacheEntry; left alone

PRUNE_HINT = "python -m diffquant.cache prune --path {entry}"
_DIGEST = r"[0-9a-f]{8,64}"  # an entry's folder name (stable_hash)


def stable_hash(obj: Any, length: int = 16) -> str:
    """A hex digest of a JSON-able object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def module_digest(module: Any, length: int = 16) -> str:
    """A hex digest of every parameter and buffer of ``module`` (a ``torch.nn.Module``: names,
    dtypes, shapes and bytes): the identity of a model's numbers, e.g. of the quantized denoiser
    a job samples with."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if tensor is None:  # a library's empty slot (e.g. Quanto's LayerNorm without affine weight)
            h.update(f"{name}:None".encode())
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]


# ---------------------------------------------------------------------------- atomic writes
class CacheWriteError(OSError):
    """A write that failed for a reason outside the program (a full disk, a read-only file system,
    permissions); ``errno`` is the original error's and the message names the path and the fix."""


# torch reports its own stream failures without errno ("basic_ios::clear: iostream error",
# "[enforce fail at inline_container.cc] . unexpected pos 576 vs 534", "file write failed").
_TORCH_IO = re.compile(r"iostream error|unexpected pos|file write failed|PytorchStreamWriter", re.I)


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    path = _existing(path)
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return path


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def _errno_in_chain(exc: BaseException) -> Optional[int]:
    """The errno of ``exc`` or of the OSError it was raised from (torch keeps the file object's
    ``OSError(ENOSPC)`` as the context of its own RuntimeError)."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        e = e.__cause__ or e.__context__
    return None


def _guess_errno(folder: Path) -> Optional[int]:
    """Why a write into ``folder`` failed when the error did not say (call before removing the
    temporary file: a full disk is full at that moment)."""
    try:
        st = os.statvfs(_existing(folder))
    except OSError:
        return None
    if st.f_bavail * st.f_frsize < 64 * 1024:
        return errno.ENOSPC
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if not os.access(_existing(folder), os.W_OK):
        return errno.EACCES
    return None


def write_error(exc: BaseException, path: Path | str) -> Optional[CacheWriteError]:
    """The :class:`CacheWriteError` that explains ``exc``, raised while writing ``path``; None if
    ``exc`` is not an I/O failure (a bug, an interrupt), which is then re-raised as it is."""
    if isinstance(exc, CacheWriteError):
        return None
    path = Path(path)
    folder = path.parent
    if isinstance(exc, OSError):
        code = _errno_in_chain(exc)
    elif isinstance(exc, RuntimeError) and _TORCH_IO.search(str(exc)):
        code = _errno_in_chain(exc) or _guess_errno(folder)
    else:
        return None
    mount = _mount_point(folder)
    where = str(path)
    if m := re.fullmatch(rf"\.({_DIGEST})\..+", folder.name):  # in CacheEntry.writing()'s folder
        where = f"{path.name} of cache entry {folder.parent / m[1]}"
    elsewhere = (
        "free space there, or write elsewhere: paths.cache_dir=<a folder with room> for "
        "the cache, hydra.run.dir=... for job outputs"
    )
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        msg = f"{what} on {mount} ({_fmt_bytes(_free_bytes(folder))} free) while writing {where}: {elsewhere}"
    elif code == errno.EROFS:
        msg = (
            f"read-only file system on {mount} while writing {where}: set paths.cache_dir=<a "
            f"writable folder> (hydra.run.dir=... for job outputs)"
        )
    elif code in (errno.EACCES, errno.EPERM):
        msg = (
            f"permission denied while writing {where} (folder {folder}): make the folder "
            f"writable, or set paths.cache_dir=<a writable folder>"
        )
    else:
        reason = os.strerror(code) if code else f"{type(exc).__name__}: {exc}"
        msg = f"cannot write {where} (folder {folder}, file system {mount}): {reason}"
    return CacheWriteError(code or errno.EIO, msg)


def _atomic_write(path: Path | str, write: Callable[[IO[bytes]], None], fsync: bool) -> None:
    """Write ``path`` through a temporary file in its folder (fsynced if ``fsync``) and rename; on
    failure remove the temporary file and explain I/O errors (:func:`write_error`)."""
    path = Path(path)
    tmp: Optional[str] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as exc:
        err = write_error(exc, path)  # before removing tmp: a full disk is still full now
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if err is not None:
            raise err from exc
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    _atomic_write(path, lambda f: f.write(data), fsync=True)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: Path | str) -> None:
    """``torch.save`` through a temporary file and a rename.

    Not fsynced (as before: that would make large writes disk-bound); after a power loss a file
    may be incomplete, which the entry's manifest then reveals.
    """
    import torch

    _atomic_write(path, lambda f: torch.save(obj, f), fsync=False)  # a file object: errno survives


# ---------------------------------------------------------------------------- manifests
def file_digest(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def _entry_files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` by its relative POSIX path, but the manifest itself."""
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            if rel != MANIFEST_FILE:
                out[rel] = p
    return out


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_manifest(folder: Path | str) -> dict[str, Any]:
    """Size and SHA-256 of every file under ``folder`` (what :meth:`CacheEntry.writing` records)."""
    files = {
        rel: {"size": p.stat().st_size, HASH: file_digest(p)} for rel, p in _entry_files(Path(folder)).items()
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "algorithm": HASH,
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return {**manifest, "manifest_sha256": _json_digest(manifest)}


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder``; ValueError if it is garbled."""
    data = json.loads((folder / MANIFEST_FILE).read_bytes())
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
    files = data.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get(HASH), str)
        for r in files.values()
    ):
        raise ValueError("no valid file list")
    if data.get("manifest_sha256") != _json_digest({k: v for k, v in data.items() if k != "manifest_sha256"}):
        raise ValueError("its own checksum does not match its content")
    return data


@dataclass
class Verdict:
    """What :func:`verify_entry` found: a status, and for a bad entry the file and the reason."""

    status: str
    path: Path
    detail: str = ""
    file: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == OK


def _canonical_key(obj: Any) -> str:
    return json.dumps(json.loads(json.dumps(obj, default=str)), sort_keys=True)


def verify_entry(path: Path | str, key: Optional[dict[str, Any]] = None) -> Verdict:
    """Check the entry folder ``path`` against its manifest (sizes, then SHA-256 of every file), and
    its ``key.json`` against ``key`` if given. Reads the files; changes nothing."""
    path = Path(path)
    if not path.exists():
        return Verdict(MISSING, path)
    if not path.is_dir():
        return Verdict(CORRUPT, path, "is not a folder")
    if not (path / MANIFEST_FILE).is_file():
        if (path / KEY_FILE).is_file():
            return Verdict(
                UNVERIFIABLE,
                path,
                f"has no {MANIFEST_FILE} (written before cache entries "
                "were verified), so its content cannot be checked",
                MANIFEST_FILE,
            )
        return Verdict(INCOMPLETE, path, f"has no {KEY_FILE} (an unfinished entry)", KEY_FILE)
    try:
        files = _read_manifest(path)["files"]
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return Verdict(CORRUPT, path, f"{MANIFEST_FILE} is garbled ({exc})", MANIFEST_FILE)
    on_disk = _entry_files(path)
    missing = sorted(set(files) - set(on_disk))
    if missing:
        return Verdict(CORRUPT, path, f"{missing[0]} is missing (listed in {MANIFEST_FILE})", missing[0])
    extra = sorted(set(on_disk) - set(files))
    if extra:
        return Verdict(
            CORRUPT,
            path,
            f"{extra[0]} was added after the entry was written (not in {MANIFEST_FILE})",
            extra[0],
        )
    for rel, rec in files.items():
        size = on_disk[rel].stat().st_size
        if size != rec["size"]:
            return Verdict(
                CORRUPT,
                path,
                f"{rel} has {size} bytes, {rec['size']} when written (truncated or overwritten)",
                rel,
            )
    for rel, rec in files.items():
        if file_digest(on_disk[rel]) != rec[HASH]:
            return Verdict(
                CORRUPT,
                path,
                f"{rel} has the size it was written with but not the same "
                f"{HASH} (changed bytes: a disk, memory or copy fault, or an edit)",
                rel,
            )
    if key is not None:
        try:
            stored = json.dumps(json.loads((path / KEY_FILE).read_bytes()), sort_keys=True)
        except (OSError, ValueError) as exc:
            return Verdict(CORRUPT, path, f"{KEY_FILE} is garbled ({exc})", KEY_FILE)
        if stored != _canonical_key(key):
            return Verdict(CORRUPT, path, f"{KEY_FILE} holds other settings than the entry's", KEY_FILE)
    return Verdict(OK, path)


# ---------------------------------------------------------------------------- reading
class CacheReadError(RuntimeError):
    """A file of a cache entry that cannot be read; the message names the entry and the fix."""


def entry_of(path: Path | str) -> Optional[Path]:
    """The cache entry folder that holds ``path`` (a folder named by a hash with a ``manifest.json``
    or ``key.json``, up to four levels up), or None."""
    p = Path(path).parent
    for _ in range(4):
        if re.fullmatch(_DIGEST, p.name) and ((p / MANIFEST_FILE).is_file() or (p / KEY_FILE).is_file()):
            return p
        if p.parent == p:
            break
        p = p.parent
    return None


def _read_error(path: Path, entry: Path, reason: str) -> CacheReadError:
    return CacheReadError(
        f"cannot read {path.relative_to(entry).as_posix()} of cache entry {entry}: {reason}. The "
        f"entry is damaged, changed after it was verified, or from an incompatible version: remove "
        f"it with `{PRUNE_HINT.format(entry=entry)}` (or delete the folder) and rerun to recompute it"
    )


def check_size(path: Path | str) -> None:
    """Raise :class:`CacheReadError` if ``path`` lies in a cache entry whose manifest records
    another size for it (a cheap check that it did not change since the entry was verified)."""
    path = Path(path)
    entry = entry_of(path)
    if entry is None:
        return
    try:
        rec = _read_manifest(entry)["files"].get(path.relative_to(entry).as_posix())
    except (OSError, ValueError):
        return
    if rec is not None:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise _read_error(path, entry, f"{type(exc).__name__}: {exc}") from exc
        if size != rec["size"]:
            raise _read_error(path, entry, f"it has {size} bytes, {rec['size']} when written")


def load_torch(path: Path | str, **kwargs: Any) -> Any:
    """``torch.load(path, **kwargs)`` for files of cache entries: checks the size against the
    entry's manifest and turns any failure into a :class:`CacheReadError` naming the entry and how
    to remove it. Files outside a cache entry load (and fail) exactly as with ``torch.load``."""
    import torch

    path = Path(path)
    entry = entry_of(path)
    if entry is None:
        return torch.load(path, **kwargs)
    check_size(path)
    try:
        return torch.load(path, **kwargs)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise _read_error(path, entry, f"{type(exc).__name__}: {msg}") from exc


# ---------------------------------------------------------------------------- entries
def _lock_for(path: Path) -> FileLock:
    # One lock object per entry and process (is_singleton): re-entrant, so done() may take it
    # while the caller holds it.
    return FileLock(str(path) + ".lock", is_singleton=True)


def _stamp() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"


class CacheEntry:
    """One cache folder ``<root>/<kind>/<hash(key)>``; ``key`` is saved beside it as ``key.json``."""

    def __init__(self, root: Path | str, kind: str, key: dict[str, Any]) -> None:
        self.key = key
        self.digest = stable_hash(key)
        self.path = Path(root) / kind / self.digest
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def verify(self) -> Verdict:
        """Check the entry against its manifest and key (see :func:`verify_entry`); changes nothing."""
        return verify_entry(self.path, self.key)

    def done(self) -> bool:
        """Whether the entry is complete and its files are those written (every file re-hashed).

        A corrupt entry is moved aside (``<hash>.corrupt-<time>``), an unverifiable (no manifest)
        or unfinished one removed, under the entry's lock and with a WARNING naming the entry and
        the file; then False, so that the caller recomputes it.
        """
        verdict = self.verify()
        if verdict.status in (OK, MISSING):
            return verdict.ok
        with self.lock():  # re-entrant: callers usually hold it already
            verdict = self.verify()  # another job may have replaced it meanwhile
            if verdict.status in (OK, MISSING):
                return verdict.ok
            self._discard(verdict)
        return False

    def _discard(self, verdict: Verdict) -> None:
        root = self.path.parent.parent
        try:
            if verdict.status == CORRUPT:
                aside = self.path.with_name(f"{self.digest}.corrupt-{_stamp()}")
                os.replace(self.path, aside)
                log.warning(
                    "cache entry %s is corrupt: %s. Moved it aside to %s and recomputing it "
                    "(`python -m diffquant.cache prune --corrupt --cache-dir %s` removes "
                    "moved-aside entries).",
                    self.path,
                    verdict.detail,
                    aside.name,
                    root,
                )
            else:
                shutil.rmtree(self.path)
                log.warning("cache entry %s %s: removed it and recomputing it.", self.path, verdict.detail)
        except OSError as exc:
            err = write_error(exc, self.path)
            raise (err or exc) from exc

    def load(self, name: str, **kwargs: Any) -> Any:
        """``torch.load`` of the entry's file ``name`` (see :func:`load_torch`)."""
        return load_torch(self.path / name, **kwargs)

    @contextlib.contextmanager
    def lock(self, timeout: float = -1) -> Iterator[None]:
        """Hold the entry's lock (blocks while another process computes it)."""
        with _lock_for(self.path).acquire(timeout=timeout):
            yield

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A temporary folder to fill; renamed to :attr:`path` (with ``key.json`` and
        ``manifest.json``) on success."""
        try:
            tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.digest}."))
        except OSError as exc:
            raise (write_error(exc, self.path) or exc) from exc
        try:
            yield tmp
            atomic_write_json(tmp / KEY_FILE, self.key)
            atomic_write_json(tmp / MANIFEST_FILE, build_manifest(tmp))
            try:
                if self.path.exists():
                    shutil.rmtree(self.path)
                os.replace(tmp, self.path)
            except OSError as exc:
                raise (write_error(exc, self.path) or exc) from exc
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


# ---------------------------------------------------------------------------- the command line
@dataclass
class Item:
    """One folder of a cache, as ``verify``/``prune`` see it."""

    path: Path
    digest: Optional[str]
    status: str
    detail: str = ""

    def lock(self) -> Optional[FileLock]:
        return None if self.digest is None else _lock_for(self.path.parent / self.digest)

    def size(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        total = 0
        for dirpath, _, filenames in os.walk(self.path):
            for name in filenames:
                with contextlib.suppress(OSError):
                    total += (Path(dirpath) / name).lstat().st_size
        return total

    def age_days(self) -> float:
        try:
            return (time.time() - self.path.stat().st_mtime) / 86400
        except OSError:
            return 0.0


def classify(path: Path) -> Item:
    """What the folder ``path`` (a child of ``<cache>/<kind>/``) is; verifies entries (under their
    lock if they look bad, so that an entry being written reads as busy, not corrupt)."""
    name = path.name
    if m := re.fullmatch(rf"({_DIGEST})", name):
        item = Item(path, m[1], *_verdict(verify_entry(path)))
        if item.status != OK:
            try:
                with item.lock().acquire(timeout=0):
                    item.status, item.detail = _verdict(verify_entry(path))
            except Timeout:
                item.status, item.detail = BUSY, "locked by a running job"
        return item
    if m := re.fullmatch(rf"({_DIGEST})\.partial", name):
        return _unless_busy(Item(path, m[1], INCOMPLETE, "resumable progress of an unfinished computation"))
    if m := re.fullmatch(rf"\.({_DIGEST})\..+", name):
        return _unless_busy(Item(path, m[1], INCOMPLETE, "temporary folder of an interrupted write"))
    if m := re.fullmatch(rf"({_DIGEST})\.corrupt-.+", name):
        return Item(path, m[1], QUARANTINED, "a corrupt entry moved aside when it was found")
    return Item(path, None, UNKNOWN, "not a cache entry")


def _verdict(v: Verdict) -> tuple[str, str]:
    return v.status, v.detail


def _unless_busy(item: Item) -> Item:
    try:
        with item.lock().acquire(timeout=0):
            return item
    except Timeout:
        item.status, item.detail = BUSY, f"locked by a running job ({item.detail})"
        return item


def scan(cache_dir: Path | str) -> list[Item]:
    """Every folder of the cache ``<cache_dir>/<kind>/...`` (lock files aside), classified."""
    items = []
    for kind in sorted(p for p in Path(cache_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for child in sorted(kind.iterdir()):
            if child.name.endswith(".lock") and child.is_file():
                continue
            items.append(classify(child))
    return items


def default_cache_dir() -> Path:
    """``paths.cache_dir`` of ``conf/paths/default.yaml``: ``$DIFFQUANT_ROOT/cache``, else ``./cache``."""
    return Path(os.environ.get("DIFFQUANT_ROOT") or os.getcwd()) / "cache"


def _show(item: Item, root: Path, size: Optional[int] = None) -> str:
    try:
        rel = item.path.relative_to(root)
    except ValueError:
        rel = item.path
    size = item.size() if size is None else size
    return f"{item.status:<13} {str(rel):<45} {_fmt_bytes(size):>9}  {item.detail}".rstrip()


def cmd_verify(args: argparse.Namespace) -> int:
    root = Path(args.cache_dir)
    if not root.is_dir():
        print(f"no cache folder {root} (set --cache-dir)", file=sys.stderr)
        return 2
    items = scan(root)
    counts: dict[str, int] = {}
    total = 0
    for item in items:
        size = item.size()
        total += size
        counts[item.status] = counts.get(item.status, 0) + 1
        print(_show(item, root, size))
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing"
    print(f"{root}: {len(items)} folders ({_fmt_bytes(total)}): {summary}")
    if counts.get(CORRUPT):
        print(
            f"corrupt entries are recomputed by the next job that needs them; remove them now with "
            f"`python -m diffquant.cache prune --corrupt --cache-dir {root}`"
        )
        return 1
    return 0


def _selected(item: Item, args: argparse.Namespace) -> bool:
    if item.status in (UNKNOWN, BUSY):
        return item.status == BUSY  # reported as skipped
    wanted = {
        s
        for flag, s in (
            (args.corrupt, CORRUPT),
            (args.corrupt, QUARANTINED),
            (args.unverifiable, UNVERIFIABLE),
            (args.incomplete, INCOMPLETE),
        )
        if flag
    }
    by_status = args.all or item.status in wanted or (not wanted and args.older_than is not None)
    return by_status and (args.older_than is None or item.age_days() > args.older_than)


def _path_item(p: Path) -> Item:
    p = Path(os.path.abspath(p))
    if not p.exists():
        raise SystemExit(f"no such path: {p}")
    if not p.is_dir() or not re.match(rf"\.?{_DIGEST}", p.name):
        entry = entry_of(p)
        if entry is None:
            raise SystemExit(f"{p} is not in a cache entry")
        p = entry
    return classify(p)


def cmd_prune(args: argparse.Namespace) -> int:
    if not (
        args.corrupt
        or args.unverifiable
        or args.incomplete
        or args.all
        or args.older_than is not None
        or args.path
    ):
        print(
            "say what to remove: --corrupt, --unverifiable, --incomplete, --all, --older-than DAYS "
            "or --path P",
            file=sys.stderr,
        )
        return 2
    if args.path:
        root = Path(args.cache_dir) if args.cache_dir else None
        candidates = [_path_item(Path(p)) for p in args.path]
    else:
        root = Path(args.cache_dir or default_cache_dir())
        if not root.is_dir():
            print(f"no cache folder {root} (set --cache-dir)", file=sys.stderr)
            return 2
        candidates = [item for item in scan(root) if _selected(item, args)]
    verb = "would remove" if args.dry_run else "removed"
    n = freed = failed = 0
    for item in candidates:
        shown_root = root or item.path.parent.parent
        if item.status == BUSY:
            print(f"skipped {_show(item, shown_root)}")
            continue
        lock = item.lock()
        try:
            with lock.acquire(timeout=0) if lock is not None else contextlib.nullcontext():
                if not item.path.exists():
                    continue
                size = item.size()
                if not args.dry_run:
                    if item.path.is_dir():
                        shutil.rmtree(item.path)
                    else:
                        item.path.unlink()
        except Timeout:
            print(f"skipped (locked by a running job) {item.path}")
            continue
        except OSError as exc:
            print(f"failed to remove {item.path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        n += 1
        freed += size
        print(f"{verb} {_show(item, shown_root, size)}")
    print(f"{verb} {n} folder{'s' if n != 1 else ''}, {_fmt_bytes(freed)} ({freed} bytes)")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffquant.cache", description="Check and clean the diffquant cache."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    default = default_cache_dir()
    v = sub.add_parser(
        "verify",
        help="list every entry as ok/corrupt/unverifiable/incomplete (exit status 1 if any is corrupt)",
    )
    v.add_argument("--cache-dir", default=str(default), help=f"the cache (default: {default})")
    p = sub.add_parser("prune", help="remove entries (never one locked by a running job)")
    p.add_argument("--cache-dir", default=None, help=f"the cache (default: {default})")
    p.add_argument("--corrupt", action="store_true", help="corrupt and moved-aside entries")
    p.add_argument("--unverifiable", action="store_true", help="entries without a manifest (older versions)")
    p.add_argument(
        "--incomplete",
        action="store_true",
        help="unfinished entries, resumable progress and temporary folders of interrupted writes",
    )
    p.add_argument("--all", action="store_true", help="everything the cache made")
    p.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="entries last written more than DAYS ago (with other flags: only those)",
    )
    p.add_argument("--path", action="append", metavar="P", help="this entry (or the entry holding this file)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed")
    args = parser.parse_args(argv)
    return cmd_verify(args) if args.command == "verify" else cmd_prune(args)


if __name__ == "__main__":
    sys.exit(main())
