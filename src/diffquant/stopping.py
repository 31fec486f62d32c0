"""Graceful stop of a run on SIGTERM / SIGUSR2 (Slurm preemption, time limit, ``scancel``).

``with graceful_stop(run_dir):`` (``app.run`` wraps its steps in it) turns those signals into a
request; the run keeps going to its next **safe point** — a :func:`check_stop` call: a step
boundary of ``app.run``, between sample batches (``eval.sampling.generate``), between block
reconstruction units and iterations (``calib.reconstruct``) — so that the write in progress (every
write is atomic) finishes. There it records where it stopped in ``<run_dir>/stopped.json`` and
raises :class:`Stopped`, a ``SystemExit``: nothing on the way treats it as a failure or a result
(not ``except Exception``, not Hydra's ``run_job``, not submitit's result file), and the process
exits with its code:

==========  =========  ================================================================
signal      exit code  meaning
==========  =========  ================================================================
SIGUSR2     75         ``EX_TEMPFAIL``: stopped before the time limit (``--signal=USR2@120``);
                       run the same command again to resume. ``slurm/*.sbatch`` requeue the
                       job on 75 (``scontrol requeue``); a cluster can do the same with
                       ``RequeueExit=75``.
SIGTERM     143        128 + 15. Slurm sent it (preemption, ``scontrol requeue``,
                       ``scancel``, the time limit) and decides itself whether the job is
                       requeued; SIGKILL follows after ``KillWait`` (default 30 s).
==========  =========  ================================================================

**A handler someone else installed is kept, and only deferred.** Under submitit (the
``hydra/launcher=slurm`` jobs) SIGUSR2 belongs to submitit's ``checkpoint_and_try_requeue``
(it resubmits the job with ``scontrol requeue`` and exits, or raises when the job timed out too
often) and SIGTERM to its ``bypass`` (logged, ignored: Slurm kills the job after ``KillWait`` and
requeues it on preemption). Such a handler runs at the next safe point instead of in the middle of
a write; if it stops the run, ``stopped.json`` names it; if it returns, the run goes on.

**Bounded wait:** when no safe point comes within ``grace_s`` seconds of the signal (default 20,
``$DIFFQUANT_STOP_GRACE_S``; below Slurm's default ``KillWait`` of 30 s), the run stops where it
is (``"safe_point": false``): an atomic write in progress then removes its temporary file, as on
any interrupt. A second identical signal also stops at once.

``stopped.json`` (written atomically; removed when the run starts again in the same folder, which
then logs what it resumes from)::

    {"format": 1, "signal": "SIGUSR2", "step": "sample",
     "where": "sampling: 3 of 8 batches done", "safe_point": true,
     "signal_at": "2026-01-01T12:00:00.000+00:00", "stopped_at": "...", "wait_s": 0.8,
     "exit_code": 75, "handler": "diffquant", "error": null,
     "next": "exit 75: run the same command again to resume ...",
     "host": "node1", "pid": 1234, "slurm_job_id": "1234_5", "slurm_restart_count": 0}

``step`` is the ``app.run`` step (configure/build/reference/quantize/sample/analyse/record);
``where`` the safe point the run stopped at (with ``safe_point: false``: the last one it passed);
``handler`` ``"diffquant"`` or the deferred handler's name; ``exit_code`` the process's exit status
when known (``null`` when the handler raised an error, which is then in ``error``).

Outside ``graceful_stop`` (the Python API, benchmarks, other threads) :func:`check_stop` does
nothing and signals keep their usual effect.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Optional

from diffquant.cache import atomic_write_json

log = logging.getLogger("diffquant")

STOP_FILE = "stopped.json"
FORMAT = 1
EXIT_REQUEUE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, run again
GRACE_ENV = "DIFFQUANT_STOP_GRACE_S"
DEFAULT_GRACE_S = 20.0
OWN_HANDLER = "diffquant"


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, SIGUSR2, and submitit's preemption signal if ``$SUBMITIT_PREEMPT_SIGNAL`` moves
    it."""
    sigs = [signal.SIGTERM, signal.SIGUSR2]
    extra = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if isinstance(extra, signal.Signals) and extra not in sigs:
        sigs.append(extra)
    return tuple(sigs)


def exit_code(signum: int) -> int:
    """75 for the warning signals (SIGUSR1/2: resume later), else 128 + the signal number."""
    return EXIT_REQUEUE if signum in (signal.SIGUSR1, signal.SIGUSR2) else 128 + int(signum)


def _next_action(signum: int) -> str:
    if exit_code(signum) == EXIT_REQUEUE:
        return (
            f"exit {EXIT_REQUEUE}: run the same command again to resume (slurm/*.sbatch "
            "requeue the job on this exit code)"
        )
    return (
        f"exit {exit_code(signum)}: Slurm requeues the job (preemption, scontrol requeue) or "
        "ends it (scancel, time limit); a rerun in this folder resumes"
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _name(handler: Any) -> str:
    if handler is signal.SIG_DFL:
        return OWN_HANDLER
    owner = getattr(handler, "__self__", None)
    qual = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    module = getattr(handler, "__module__", None) or type(owner).__module__
    return f"{module}.{qual}"


class Stopped(SystemExit):
    """Raised at a safe point after a stop signal; the process exits with ``code``.

    A ``SystemExit`` so that ``except Exception`` blocks, Hydra's ``run_job`` and submitit's
    ``process_job`` let it through: a stopped job is neither a failure nor a result.
    """

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record["exit_code"])
        self.record = record

    def __str__(self) -> str:
        r = self.record
        return f"stopped by {r['signal']} at step {r['step']} ({r['where']}); {r['next']}"


@dataclass
class _Request:
    signum: int
    at: float  # time.time()
    at_iso: str


class GracefulStop:
    """The signal handlers and the stop request of one :func:`graceful_stop` block."""

    def __init__(self, run_dir: Path | str, signals: tuple[int, ...], grace_s: float) -> None:
        self.run_dir = Path(run_dir)
        self.signals = signals
        self.grace_s = grace_s
        self.step = "configure"
        self.where = "start"
        self._previous: dict[int, Any] = {}
        self._requests: list[_Request] = []
        self._acting = False
        self._alarm = False
        self._timer: Optional[threading.Timer] = None
        self._lock = threading.Lock()
        self._main = threading.get_ident()

    # ------------------------------------------------------------------ handlers
    def install(self) -> None:
        for sig in self.signals:
            prev = signal.getsignal(sig)
            if prev is signal.SIG_IGN or prev is None:  # ignored, or a handler set outside Python
                continue
            self._previous[sig] = prev
            signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        self._cancel_timer()
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    @property
    def pending(self) -> bool:
        return bool(self._requests)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if self._alarm:  # the grace period is over: stop where we are
            self._alarm = False
            if self._requests and not self._acting:
                log.warning(
                    "no safe point within %.0fs of %s: stopping at once",
                    self.grace_s,
                    signal.Signals(self._requests[0].signum).name,
                )
                self._act(frame, safe_point=False)
            return
        if self._acting:
            return
        repeated = any(r.signum == signum for r in self._requests)
        self._requests.append(_Request(signum, time.time(), _now()))
        name = signal.Signals(signum).name
        if repeated:
            log.warning("%s again: stopping at once", name)
            self._act(frame, safe_point=False)
            return
        owner = self._previous.get(signum)
        what = "stopping" if owner is signal.SIG_DFL else f"handing it to {_name(owner)}, which decides,"
        log.warning(
            "received %s during step %s (%s): %s at the next safe point (at most %.0fs)",
            name,
            self.step,
            self.where,
            what,
            self.grace_s,
        )
        if self._timer is None:
            self._timer = threading.Timer(self.grace_s, self._grace_over)
            self._timer.daemon = True
            self._timer.start()

    def _grace_over(self) -> None:  # in the timer thread
        with self._lock:
            if self._timer is None or not self._requests:
                return
            self._alarm = True
            # runs our handler in the main thread, like the signal; never the default action
            _thread.interrupt_main(self._requests[0].signum)

    def _cancel_timer(self) -> None:
        with self._lock:  # after this, _grace_over sends nothing
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    # ------------------------------------------------------------------ stopping
    def check(self, frame: Optional[FrameType]) -> None:
        if self._requests and not self._acting and threading.get_ident() == self._main:
            self._act(frame, safe_point=True)

    def _act(self, frame: Optional[FrameType], safe_point: bool) -> None:
        """Stop for the pending requests, oldest first: ours raise :class:`Stopped`; a deferred
        handler runs now and decides (if it returns, the run goes on)."""
        self._acting = True
        try:
            while self._requests:
                req = self._requests.pop(0)
                handler = self._previous.get(req.signum, signal.SIG_DFL)
                if handler is signal.SIG_DFL:
                    record = self._record(
                        req, safe_point, exit_code(req.signum), OWN_HANDLER, None, _next_action(req.signum)
                    )
                    raise Stopped(record)
                try:
                    handler(req.signum, frame)
                except SystemExit as exc:  # sys.exit(): None is status 0, a message status 1
                    code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
                    self._record(
                        req,
                        safe_point,
                        code % 256,
                        _name(handler),
                        None,
                        f"exit {code % 256} by {_name(handler)}",
                    )
                    raise
                except BaseException as exc:
                    self._record(
                        req,
                        safe_point,
                        None,
                        _name(handler),
                        f"{type(exc).__name__}: {exc}",
                        f"{_name(handler)} raised {type(exc).__name__}",
                    )
                    raise
                log.info(
                    "%s returned: %s ignored, the run goes on",
                    _name(handler),
                    signal.Signals(req.signum).name,
                )
            self._cancel_timer()
        finally:
            self._acting = False

    def _record(
        self,
        req: _Request,
        safe_point: bool,
        code: Optional[int],
        handler: str,
        error: Optional[str],
        next_action: str,
    ) -> dict[str, Any]:
        env = os.environ
        job = env.get("SLURM_JOB_ID")
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        record = {
            "format": FORMAT,
            "signal": signal.Signals(req.signum).name,
            "step": self.step,
            "where": self.where,
            "safe_point": safe_point,
            "signal_at": req.at_iso,
            "stopped_at": _now(),
            "wait_s": round(time.time() - req.at, 3),
            "exit_code": code,
            "handler": handler,
            "error": error,
            "next": next_action,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": job,
            "slurm_restart_count": int(env.get("SLURM_RESTART_COUNT", 0) or 0),
        }
        try:
            atomic_write_json(self.run_dir / STOP_FILE, record)
        except OSError as err:  # the stop goes on without its record
            log.error("could not write %s: %s", self.run_dir / STOP_FILE, err)
        log.warning(
            "stopped by %s at step %s (%s)%s; %s -> %s",
            record["signal"],
            self.step,
            self.where,
            "" if safe_point else " [not at a safe point]",
            next_action,
            self.run_dir / STOP_FILE,
        )
        return record


_active: Optional[GracefulStop] = None


def read_stop(run_dir: Path | str) -> Optional[dict[str, Any]]:
    """The ``stopped.json`` of ``run_dir``, or None."""
    path = Path(run_dir) / STOP_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _grace_from_env() -> float:
    raw = os.environ.get(GRACE_ENV)
    if raw is None:
        return DEFAULT_GRACE_S
    try:
        value = float(raw)
    except ValueError as err:
        raise ValueError(f"${GRACE_ENV}={raw!r} is not a number of seconds") from err
    if value <= 0:
        raise ValueError(f"${GRACE_ENV}={raw!r} must be positive")
    return value


@contextlib.contextmanager
def graceful_stop(
    run_dir: Path | str, signals: Optional[tuple[int, ...]] = None, grace_s: Optional[float] = None
) -> Iterator[Optional[GracefulStop]]:
    """Handle stop signals (default :func:`stop_signals`) as requests honoured at the next
    :func:`check_stop`, recording ``<run_dir>/stopped.json``; see the module doc.

    Yields the controller, or None where signals cannot be handled (not the main thread). Nested
    blocks share the outer handlers and record into the inner ``run_dir``.
    """
    global _active
    run_dir = Path(run_dir)
    previous = read_stop(run_dir)
    if previous is not None:
        log.info(
            "resuming after a stop: %s at step %s (%s) at %s, exit code %s",
            previous.get("signal"),
            previous.get("step"),
            previous.get("where"),
            previous.get("stopped_at"),
            previous.get("exit_code"),
        )
        (run_dir / STOP_FILE).unlink(missing_ok=True)
    if _active is not None:  # nested: the outer block's handlers stay
        outer = (_active.run_dir, _active.step, _active.where)
        _active.run_dir = run_dir
        try:
            yield _active
        finally:
            _active.run_dir, _active.step, _active.where = outer
        return
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    ctl = GracefulStop(
        run_dir,
        tuple(signals) if signals is not None else stop_signals(),
        grace_s if grace_s is not None else _grace_from_env(),
    )
    ctl.install()
    _active = ctl
    try:
        yield ctl
        if ctl.pending:  # the block finished before its next safe point: nothing left to stop
            log.warning(
                "%s came after the last safe point: the run finished first",
                signal.Signals(ctl._requests[0].signum).name,
            )
    finally:
        _active = None
        ctl.restore()


def check_stop(step: Optional[str] = None, where: Optional[str] = None) -> None:
    """A safe point: stop here if a stop signal came (raises :class:`Stopped`, or runs the
    deferred handler). ``step`` names the ``app.run`` step that starts here; ``where`` describes
    the point (``"sampling: 3 of 8 batches done"``). Does nothing outside :func:`graceful_stop`."""
    ctl = _active
    if ctl is None:
        return
    if step is not None:
        ctl.step, ctl.where = step, f"start of step {step}"
    if where is not None:
        ctl.where = where
    if ctl.pending:
        ctl.check(sys._getframe(1))


def current_stop() -> Optional[GracefulStop]:
    """The active :func:`graceful_stop` controller, if any."""
    return _active


__all__ = [
    "STOP_FILE",
    "EXIT_REQUEUE",
    "Stopped",
    "GracefulStop",
    "graceful_stop",
    "check_stop",
    "current_stop",
    "read_stop",
    "stop_signals",
    "exit_code",
]
