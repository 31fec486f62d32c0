"""Graceful stop (diffquant.stopping): SIGTERM / SIGUSR2 stop a run at its next safe point, record
``stopped.json`` and exit with 143 / 75; a handler installed before (submitit's) is deferred to the
safe point, not replaced; the stopped run resumes to the same metrics. Signals are sent to this
process (``os.kill``); the run.py test checks the real exit status."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from diffquant.stopping import (
    EXIT_REQUEUE,
    STOP_FILE,
    Stopped,
    check_stop,
    current_stop,
    graceful_stop,
    read_stop,
)

TINY = [
    "model.num_inference_steps=5",
    "evaluator.n_samples=8",
    "evaluator.batch_size=2",
    "evaluator.chunk_size=2",
    "logger=none",
]


def _signal_self(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # the Python-level handler runs at the next bytecode; make sure it has


def test_check_stop_outside_graceful_stop_does_nothing(tmp_path):
    assert current_stop() is None
    check_stop(step="sample", where="anywhere")  # no error, no file
    with graceful_stop(tmp_path):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
    assert not (tmp_path / STOP_FILE).exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGUSR2, EXIT_REQUEUE), (signal.SIGTERM, 143)])
def test_signal_stops_at_the_next_safe_point(tmp_path, sig, code):
    with pytest.raises(Stopped) as stop:
        with graceful_stop(tmp_path, grace_s=60):
            check_stop(step="sample")
            check_stop(where="sampling: 3 of 8 batches done")
            _signal_self(sig)
            reached = True  # the signal itself does not interrupt
            check_stop(where="sampling: 4 of 8 batches done")
            pytest.fail("check_stop did not stop")
    assert reached and stop.value.code == code and isinstance(stop.value, SystemExit)
    rec = json.loads((tmp_path / STOP_FILE).read_text())
    assert rec == stop.value.record
    assert rec["format"] == 1 and rec["signal"] == signal.Signals(sig).name
    assert (rec["step"], rec["where"], rec["safe_point"]) == ("sample", "sampling: 4 of 8 batches done", True)
    assert rec["exit_code"] == code and rec["handler"] == "diffquant" and rec["error"] is None
    assert rec["pid"] == os.getpid() and 0 <= rec["wait_s"] < 30 and rec["signal_at"] <= rec["stopped_at"]
    assert f"exit {code}" in rec["next"] and "step sample" in str(stop.value)
    assert signal.getsignal(sig) is signal.SIG_DFL


def test_no_safe_point_within_the_grace_period_stops_where_it_is(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(Stopped) as stop:
        with graceful_stop(tmp_path, grace_s=0.5):
            check_stop(step="quantize")
            _signal_self(signal.SIGTERM)
            while time.monotonic() - t0 < 10:  # a long computation without safe points
                sum(range(10_000))
    assert 0.5 <= time.monotonic() - t0 < 5
    rec = read_stop(tmp_path)
    assert rec["safe_point"] is False and rec["step"] == "quantize" and stop.value.code == 143


def test_a_second_identical_signal_stops_at_once(tmp_path):
    with pytest.raises(Stopped):
        with graceful_stop(tmp_path, grace_s=60):
            _signal_self(signal.SIGUSR2)
            _signal_self(signal.SIGUSR2)
            pytest.fail("not stopped by the second signal")
    assert read_stop(tmp_path)["safe_point"] is False


class Framework:
    """Stands for submitit's SignalHandler: SIGTERM is logged and ignored (``bypass``), SIGUSR2
    requeues and exits (``checkpoint_and_try_requeue`` ends in ``sys.exit(-1)``)."""

    def __init__(self):
        self.calls = []

    def bypass(self, signum, frame):
        self.calls.append(("bypass", signum))

    def checkpoint_and_try_requeue(self, signum, frame):
        self.calls.append(("requeue", signum))
        sys.exit(-1)


@pytest.fixture
def framework():
    fw = Framework()
    before = {
        s: signal.signal(s, h)
        for s, h in ((signal.SIGTERM, fw.bypass), (signal.SIGUSR2, fw.checkpoint_and_try_requeue))
    }
    yield fw
    for s, h in before.items():
        signal.signal(s, h)


def test_a_handler_installed_before_is_deferred_to_the_safe_point(tmp_path, framework):
    with pytest.raises(SystemExit) as stop:
        with graceful_stop(tmp_path, grace_s=60):
            _signal_self(signal.SIGTERM)
            assert framework.calls == []  # deferred, not dropped
            check_stop(step="sample", where="sampling: 1 of 4 batches done")
            assert framework.calls == [("bypass", signal.SIGTERM)]  # it ignores it: the run goes on
            assert not (tmp_path / STOP_FILE).exists()
            _signal_self(signal.SIGUSR2)
            assert framework.calls == [("bypass", signal.SIGTERM)]
            check_stop(where="sampling: 2 of 4 batches done")
            pytest.fail("the deferred handler did not stop the run")
    assert not isinstance(stop.value, Stopped) and stop.value.code == -1  # the framework's own exit
    assert framework.calls[-1] == ("requeue", signal.SIGUSR2)
    rec = read_stop(tmp_path)
    assert rec["signal"] == "SIGUSR2" and rec["where"] == "sampling: 2 of 4 batches done"
    assert rec["handler"].endswith("Framework.checkpoint_and_try_requeue") and rec["exit_code"] == 255
    assert signal.getsignal(signal.SIGUSR2) == framework.checkpoint_and_try_requeue  # given back


def test_deferred_handler_runs_anyway_after_the_grace_period(tmp_path, framework):
    with pytest.raises(SystemExit):
        with graceful_stop(tmp_path, grace_s=0.3):
            _signal_self(signal.SIGUSR2)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10:
                sum(range(10_000))
    assert framework.calls == [("requeue", signal.SIGUSR2)]
    assert read_stop(tmp_path)["safe_point"] is False


# ---------------------------------------------------------------------------- through app.run
def _sampling_counter(monkeypatch, stop_at=None, sig=signal.SIGUSR2):
    """Count DiffusionModel.sample calls; send ``sig`` while sampling call number ``stop_at``."""
    from diffquant.models.base import DiffusionModel

    calls, sent = [], []
    original = DiffusionModel.sample

    def sample(self, indices, seed):
        calls.append(list(indices))
        if len(calls) == stop_at and not sent:
            sent.append(sig)
            _signal_self(sig)
        return original(self, indices, seed)

    monkeypatch.setattr(DiffusionModel, "sample", sample)
    return calls


def test_stopped_run_records_and_resumes_to_the_same_metrics(make_cfg, monkeypatch, caplog):
    from diffquant.app import run

    reference = run(make_cfg(TINY, name="reference"))
    cfg = make_cfg(TINY, name="job")
    run_dir = Path(cfg.paths.output_dir)
    calls = _sampling_counter(monkeypatch, stop_at=2)
    with pytest.raises(Stopped) as stop:
        run(cfg)
    assert stop.value.code == EXIT_REQUEUE
    rec = read_stop(run_dir)
    # the batch being sampled when the signal came is finished and saved, then the run stops
    assert (rec["step"], rec["where"], rec["safe_point"]) == ("sample", "sampling: 2 of 4 batches done", True)
    assert len(list((run_dir / "progress").glob("batch_*.pt"))) == 2 and calls == [[0, 1], [2, 3]]
    assert not (run_dir / "metrics.json").exists()
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL

    calls.clear()
    with caplog.at_level(logging.INFO, logger="diffquant"):
        resumed = run(make_cfg(TINY, name="job"))
    assert calls == [[4, 5], [6, 7]]  # finished batches are not sampled again
    assert "resuming after a stop: SIGUSR2 at step sample" in caplog.text
    assert not (run_dir / STOP_FILE).exists()  # present only while the run is stopped
    for key in ("fid", "inception_score", "n_samples", "config_hash"):
        assert resumed[key] == reference[key], key


def test_stop_between_reconstruction_units_keeps_the_saved_units(tmp_path, one_thread):
    from diffquant.calib import (
        CalibSettings,
        ReconSettings,
        calibrate_act_ranges,
        collect_calibration,
        reconstruct,
    )
    from diffquant.quant import QuantConfig, quantize_denoiser
    from tiny_models import TinyDiffusion

    calib = CalibSettings(n_samples=4, step_stride=3, batch_size=4, shard_rows=10)
    stream = collect_calibration(TinyDiffusion(), calib, tmp_path / "cache")
    recon = ReconSettings(weight_iters=4, act_iters=2, batch_size=8, capture_batch_size=16)
    w4a8 = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)

    def calibrated(progress_dir, on_unit_done=None):
        model = TinyDiffusion()
        quantize_denoiser(model.denoiser, model.spec, w4a8, timesteps=model.timesteps)
        calibrate_act_ranges(model.denoiser, stream, method="lp", n_rows=16, batch_size=8)
        return model, reconstruct(
            model.denoiser, model.spec, stream, recon, progress_dir=progress_dir, on_unit_done=on_unit_done
        )

    def signal_after_unit_3(i, report):
        if i == 2:
            _signal_self(signal.SIGTERM)

    with pytest.raises(Stopped):
        with graceful_stop(tmp_path / "run", grace_s=60):
            calibrated(tmp_path / "recon", signal_after_unit_3)
    rec = read_stop(tmp_path / "run")
    assert rec["where"].startswith("block reconstruction: 3 of ") and rec["safe_point"]
    # what a resumed reconstruction starts from (that it then matches an uninterrupted one is
    # tests/test_calib_recon.py::test_resume_after_interruption_matches_uninterrupted)
    assert json.loads((tmp_path / "recon" / "progress.json").read_text())["done"] == 3


def test_cli_run_exits_75_on_sigusr2(tmp_path):
    """``python run.py`` (Hydra's main): SIGUSR2 mid-sampling ends the process with status 75 after
    the batch in progress (resuming is the in-process test above, and tests/test_slurm_*.py)."""
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        str(ROOT / "run.py"),
        *TINY,
        "evaluator.batch_size=1",
        "evaluator.n_samples=16",  # enough batches left to signal one mid-way
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={tmp_path}/cache",
    ]
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "DIFFQUANT_STOP_GRACE_S": "120",  # a batch may take long on a loaded machine
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "progress").glob("batch_*.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, "no batch finished"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR2)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_REQUEUE, out[-3000:]
    rec = read_stop(run_dir)
    assert rec["signal"] == "SIGUSR2" and rec["step"] == "sample" and rec["exit_code"] == EXIT_REQUEUE
    done = len(list((run_dir / "progress").glob("batch_*.pt")))
    assert 1 <= done < 16 and not (run_dir / "metrics.json").exists()
    assert rec["where"] == f"sampling: {done} of 16 batches done" and rec["safe_point"]
    log = (run_dir / "run.log").read_text()
    assert "received SIGUSR2 during step sample" in log and "stopped by SIGUSR2 at step sample" in log
