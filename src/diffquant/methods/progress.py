"""Resumable progress of a method's training loop, kept in the method's ``progress`` folder.

:func:`~diffquant.methods.result_cache.run_method` gives every method a folder that survives a
killed job and is removed once the result is stored. A method that trains for long (QuEST's
finetuning, AccuQuant's trajectory calibration) saves there everything its loop reads — the
trained tensors, optimiser and LR-scheduler state, generator states, counters and the reports so
far — at its natural boundaries (always) and every ``progress_every`` optimiser steps in between
(skipped while saving would take more than :data:`MAX_OVERHEAD` of the time). A restarted job
recomputes (or loads from the cache) what came before the loop, loads the last save and goes on;
the result is bit-identical to that of an uninterrupted job.

Files of one :class:`Checkpointer` (``<prefix>`` = ``train`` by default):

* ``<prefix>_state_<n>.pt`` — the state of save ``n`` (``torch.save``; tensors on the CPU);
* ``<prefix>_progress.json`` — the index: fingerprint, the state file's name, where the loop was
  (``at``) and the number of saves.

A save writes the state file (atomically), then the index naming it (atomically), then deletes
older state files: a kill at any moment leaves an index and the complete state file it names.

The *fingerprint* says what a state belongs to: the method's config, the plan of the loop (what
trains, in which order) and a digest (:func:`tensor_digest`) of the model when the loop started,
i.e. of what a restarted job recomputed. Progress with another fingerprint (other code, a PTQ base
recomputed differently) is ignored with a WARNING and replaced by the next save.

:func:`save_file` / :func:`load_file` keep one-off side files beside it (e.g. AccuQuant's FP
trajectories), under their own fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from diffquant.cache import atomic_torch_save, atomic_write_json

log = logging.getLogger(__name__)

FORMAT = 1
MAX_OVERHEAD = 0.05
"""Saves within a phase are skipped while the last one took more than this fraction of the time
since it (boundary saves always happen)."""


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _normal(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _differing(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def cpu_tensors(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU copies of ``params`` (what a state saves of trained parameters)."""
    return {n: p.detach().cpu().clone() for n, p in params.items()}


@torch.no_grad()
def load_tensors(params: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
    """Copy saved ``values`` into ``params`` (same names and shapes, else ValueError)."""
    if set(params) != set(values):
        other = sorted(set(params) ^ set(values))
        raise ValueError(f"saved progress has other tensors than those trained: {other[:5]}")
    for n, p in params.items():
        p.copy_(values[n])


class Checkpointer:
    """Saves and loads the progress of one training loop in ``folder`` (see the module doc).

    ``folder=None`` switches it off: :meth:`load` returns None, :meth:`save` does nothing.
    ``every``: save within a phase every that many optimiser steps (0 = at boundaries only;
    see :meth:`due`).
    """

    def __init__(
        self,
        folder: Optional[Path],
        fingerprint: Mapping[str, Any],
        *,
        every: int = 0,
        prefix: str = "train",
        what: str = "training",
    ) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.fingerprint = _normal({"format": FORMAT, **fingerprint})
        self.every = int(every)
        self.prefix, self.what = prefix, what
        self.saves = 0  # saves so far (also those of the stopped job resumed)
        self.written = 0  # saves by this job, taking ``seconds``; the last one ``bytes`` long
        self.seconds = 0.0
        self.bytes = 0
        self._last: Optional[tuple[float, float]] = None  # (seconds, end) of the last save

    @property
    def index(self) -> Optional[Path]:
        return self.folder / f"{self.prefix}_progress.json" if self.folder is not None else None

    def due(self, steps: int) -> bool:
        """Whether a save within a phase is due after ``steps`` optimiser steps: every
        ``every`` steps, unless that would spend more than :data:`MAX_OVERHEAD` of the time
        saving (the last save took longer than that fraction of the time since)."""
        if self.folder is None or self.every <= 0 or steps <= 0 or steps % self.every:
            return False
        if not MAX_OVERHEAD or self._last is None:
            return True
        took, ended = self._last
        return took <= MAX_OVERHEAD * (time.perf_counter() - ended)

    def load(self) -> Optional[dict[str, Any]]:
        """The last saved state, or None (nothing saved, or saved for another fingerprint or
        unreadable: then with a WARNING)."""
        if self.index is None or not self.index.exists():
            return None
        try:
            meta = json.loads(self.index.read_text())
            if meta.get("fingerprint") != self.fingerprint:
                keys = _differing(meta.get("fingerprint") or {}, self.fingerprint)
                log.warning(
                    "ignoring the %s progress in %s: it was saved for other settings or "
                    "another starting state (differing: %s); starting over",
                    self.what,
                    self.folder,
                    ", ".join(keys),
                )
                return None
            state = torch.load(self.folder / meta["state"], map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - progress is an optimisation: never fatal
            log.warning(
                "ignoring unreadable %s progress in %s (%s: %s); starting over",
                self.what,
                self.folder,
                type(exc).__name__,
                exc,
            )
            return None
        log.info("resuming %s from %s (save %d: %s)", self.what, self.folder, meta["saves"], meta["at"])
        self.saves = int(meta["saves"])
        return state

    def save(self, state: Mapping[str, Any], at: str) -> None:
        """Write ``state`` (tensors on the CPU or moved there) as the newest progress; ``at``
        says where the loop is, for the log and the index."""
        if self.folder is None:
            return
        t0 = time.perf_counter()
        name = f"{self.prefix}_state_{self.saves + 1:06d}.pt"
        atomic_torch_save(dict(state), self.folder / name)
        atomic_write_json(
            self.index, {"fingerprint": self.fingerprint, "state": name, "saves": self.saves + 1, "at": at}
        )
        self.saves += 1
        for old in self.folder.glob(f"{self.prefix}_state_*.pt"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.bytes = (self.folder / name).stat().st_size
        end = time.perf_counter()
        self._last = (end - t0, end)
        self.written += 1
        self.seconds += end - t0
        log.debug("saved %s progress (%s): %d bytes", self.what, at, self.bytes)

    def within(self, outer: Callable[[dict[str, Any]], dict[str, Any]]) -> Within:
        """This checkpointer for an inner loop: the inner loop's state is wrapped by ``outer``
        (which adds what the outer loop needs to resume) before it is saved."""
        return Within(self, outer)

    def summary(self) -> str:
        return (
            f"{self.written} {self.what} progress saves in {self.seconds:.2f}s, the last "
            f"{self.bytes / 2**20:.2f} MiB"
        )


class Within:
    """A :class:`Checkpointer` seen from an inner loop (:meth:`Checkpointer.within`)."""

    def __init__(self, checkpointer: Checkpointer, outer: Callable[[dict[str, Any]], dict[str, Any]]):
        self.checkpointer, self.outer = checkpointer, outer

    def due(self, steps: int) -> bool:
        return self.checkpointer.due(steps)

    def save(self, state: dict[str, Any], at: str) -> None:
        self.checkpointer.save(self.outer(state), at)


def save_file(folder: Optional[Path], name: str, fingerprint: Mapping[str, Any], obj: Any) -> None:
    """Keep ``obj`` in ``folder/name`` (atomically) with ``fingerprint``; no-op without folder."""
    if folder is not None:
        atomic_torch_save({"fingerprint": _normal(dict(fingerprint)), "payload": obj}, Path(folder) / name)


def load_file(folder: Optional[Path], name: str, fingerprint: Mapping[str, Any]) -> Optional[Any]:
    """What :func:`save_file` kept in ``folder/name`` for ``fingerprint``; else None."""
    path = Path(folder) / name if folder is not None else None
    if path is None or not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        log.warning("ignoring unreadable %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    if saved.get("fingerprint") != _normal(dict(fingerprint)):
        log.warning("ignoring %s: saved for other settings", path)
        return None
    return saved["payload"]
