"""Stopped QuEST / AccuQuant jobs resume from their progress folder with the result of an
uninterrupted job, bit for bit (:mod:`diffquant.methods.progress`).

A kill is simulated by raising from :meth:`Checkpointer.save` right after the K-th save: the
process state is dropped, only the cache (with the entry's ``.partial`` progress folder)
survives, and the resumed job starts from a fresh model object. One test kills ``run.py`` for
real (SIGKILL) and compares ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from diffquant.calib import CalibSettings, ReconSettings, observing_act_ranges
from diffquant.context import RunContext
from diffquant.methods import accuquant as aq
from diffquant.methods import progress as progress_mod
from diffquant.methods.base import MethodResult
from diffquant.methods.progress import Checkpointer
from diffquant.methods.ptq import PTQConfig
from diffquant.methods.quest import QuestConfig
from diffquant.methods.result_cache import run_method
from diffquant.quant import QuantConfig, quantize_denoiser
from diffquant.quant.checkpoint import quantizer_state_dict
from diffquant.registry import METHODS
from tiny_models import TinyDiffusion

W4A4 = QuantConfig(name="w4a4", weight_bits=4, act_bits=4)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def every_save(monkeypatch):
    """Saves within a phase exactly every ``progress_every`` steps (however slow), so that the
    kills below land where they say."""
    monkeypatch.setattr(progress_mod, "MAX_OVERHEAD", 0)


class Killed(Exception):
    """Stands for a SIGKILL right after a progress save."""


def kill_after(monkeypatch, n_saves: int) -> None:
    """Make this process 'die' right after its ``n_saves``-th progress save."""
    original, count = Checkpointer.save, [0]

    def save(self, state, at):
        original(self, state, at)
        count[0] += 1
        if count[0] == n_saves:
            raise Killed(at)

    monkeypatch.setattr(Checkpointer, "save", save)


def run(name: str, make_model, cfg, cache: Path, monkeypatch, kill: int | None = None):
    """``run_method`` of method ``name`` on a fresh model; with ``kill``, dies after that many
    progress saves (then returns None)."""
    model = make_model()
    ctx = RunContext(run_dir=cache.parent / "run", cache_dir=cache, device=torch.device("cpu"))
    method = METHODS.get(name)()
    with monkeypatch.context() as m:
        if kill is not None:
            kill_after(m, kill)
        try:
            result = run_method(method, model, W4A4, cfg, ctx)
        except Killed:
            assert kill is not None
            return None
    assert kill is None, "the run ended before it was to be killed"
    return {
        "quant": quantizer_state_dict(model.denoiser),
        "params": {k: v.detach().clone() for k, v in model.denoiser.state_dict().items()},
        "metrics": {k: v for k, v in result.metrics.items() if not k.endswith("_s")},
        "files": result.files,
    }


def assert_same(resumed: dict, uninterrupted: dict) -> None:
    for part in ("quant", "params"):
        a, b = resumed[part], uninterrupted[part]
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{part} differ: {different[:5]}"
    assert resumed["metrics"] == uninterrupted["metrics"]


def partials(cache: Path, name: str) -> list[Path]:
    return sorted((cache / name).glob("*.partial"))


def kill_and_resume(name, make_model, cfg, cache, monkeypatch, caplog, kills) -> dict:
    """Kill a run after ``kills[0]`` saves, the resumed run after ``kills[1]`` more, ...; then
    resume to the end and return the outcome."""
    for n in kills:
        assert run(name, make_model, cfg, cache, monkeypatch, kill=n) is None
        assert list(partials(cache, name)[0].glob("train_state_*.pt"))
    with caplog.at_level(logging.INFO, logger="diffquant.methods.progress"):
        out = run(name, make_model, cfg, cache, monkeypatch)
    assert "resuming" in caplog.text
    assert not partials(cache, name)  # the result is stored: progress removed
    return out


# ---------------------------------------------------------------------------- AccuQuant
def fake_ptq(model, quant_cfg, ptq_cfg, ctx):
    """The PTQ base in miniature (min-max ranges from FP samples): recomputed identically by a
    restarted job, as the cached PTQ result is loaded."""
    quantize_denoiser(model.denoiser, model.spec, quant_cfg, timesteps=model.timesteps)
    with observing_act_ranges(model.denoiser, "minmax"):
        model.sample_latents(list(range(8)), 123)
    return MethodResult(model, quant_cfg, {})


def accuquant_cfg(**kw) -> aq.AccuQuantConfig:
    return aq.AccuQuantConfig(
        **{
            "group_size": 2,
            "iters_per_group": 2,
            "epochs": 2,
            "n_samples": 8,
            "batch_size": 4,
            "act_lr": 1e-2,
            "bias_lr": 1e-3,
            **kw,
        }
    )


def tiny5() -> TinyDiffusion:
    return TinyDiffusion(steps=5)  # 3 groups of 2, 2, 1 steps


@pytest.mark.parametrize(
    "order, start, learn, every, guard, kills",
    [
        # interleaved: saves at step 4 (mid epoch 0), 6 (end of epoch 0), 8, 12
        ("interleaved", "quant", ["act_scale", "weight_round"], 4, True, (1, 1)),
        ("interleaved", "fp", ["act_scale"], 4, False, (3,)),
        # sequential: saves after each group (steps 2, 4, 6, ...) and at step 3 (mid group 1): kill
        # there, then after group 1 (group 2 starts where the quantized chain of group 1 ended)
        ("sequential", "quant", ["act_scale", "bias"], 3, False, (2, 1)),
        ("sequential", "fp", ["act_scale"], 3, True, (4,)),
    ],
)
def test_accuquant_resumes_bit_identically(
    order, start, learn, every, guard, kills, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(aq, "load_or_run_ptq", fake_ptq)
    cfg = accuquant_cfg(
        order=order, group_start=start, learn=learn, progress_every=every, guard=guard, guard_samples=4
    )
    uninterrupted = run("accuquant", tiny5, cfg, tmp_path / "a" / "cache", monkeypatch)

    cache = tmp_path / "b" / "cache"
    assert run("accuquant", tiny5, cfg, cache, monkeypatch, kill=kills[0]) is None
    assert (partials(cache, "accuquant")[0] / aq.TRAJECTORIES_FILE).is_file()
    # the FP trajectories are loaded from the progress folder, not sampled again
    monkeypatch.setattr(aq, "fp_trajectories", lambda *a, **k: pytest.fail("resampled"))
    resumed = kill_and_resume("accuquant", tiny5, cfg, cache, monkeypatch, caplog, kills[1:])
    assert_same(resumed, uninterrupted)
    groups = lambda out: [
        {k: v for k, v in g.items() if k != "seconds"}
        for g in json.loads(out["files"]["accuquant_groups.json"])["groups"]
    ]
    assert groups(resumed) == groups(uninterrupted)


def tiny5_plms() -> TinyDiffusion:
    """PLMS (PNDM, skip_prk_steps): 6 sampler calls for 5 steps, history between them."""
    from diffusers import PNDMScheduler

    return TinyDiffusion(
        steps=5,
        scheduler=PNDMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
    )


@pytest.mark.parametrize("order, kills", [("sequential", (2, 1)), ("interleaved", (1, 1))])
def test_accuquant_resumes_bit_identically_on_a_multistep_sampler(
    order, kills, tmp_path, monkeypatch, caplog
):
    """With a sampler that keeps state (PLMS), the quantized chain a group starts from
    (``group_start: quant``) is saved with its model outputs, from which its scheduler state is
    rebuilt: the resumed job ends where the uninterrupted one does."""
    monkeypatch.setattr(aq, "load_or_run_ptq", fake_ptq)
    cfg = accuquant_cfg(
        order=order,
        group_start="quant",
        learn=["act_scale", "weight_round"],
        progress_every=3,
        guard=True,
        guard_samples=4,
    )
    uninterrupted = run("accuquant", tiny5_plms, cfg, tmp_path / "a" / "cache", monkeypatch)
    assert uninterrupted["metrics"]["accuquant_groups"] == 3  # 6 calls: groups of 2

    cache = tmp_path / "b" / "cache"
    assert run("accuquant", tiny5_plms, cfg, cache, monkeypatch, kill=kills[0]) is None
    resumed = kill_and_resume("accuquant", tiny5_plms, cfg, cache, monkeypatch, caplog, kills[1:])
    assert_same(resumed, uninterrupted)


def test_accuquant_ignores_progress_of_another_start(tmp_path, monkeypatch, caplog):
    """Progress saved on another PTQ base (e.g. recomputed differently) is not resumed."""
    monkeypatch.setattr(aq, "load_or_run_ptq", fake_ptq)
    cfg = accuquant_cfg(progress_every=1)
    cache = tmp_path / "cache"
    assert run("accuquant", tiny5, cfg, cache, monkeypatch, kill=3) is None

    def other_ptq(model, quant_cfg, ptq_cfg, ctx):
        out = fake_ptq(model, quant_cfg, ptq_cfg, ctx)
        with torch.no_grad():
            next(iter(aq.quant_parameters(model.denoiser, "act_scale").values())).mul_(1.5)
        return out

    monkeypatch.setattr(aq, "load_or_run_ptq", other_ptq)
    steps = []
    original = aq.TrajectoryCalibration._optimizer_step
    monkeypatch.setattr(
        aq.TrajectoryCalibration, "_optimizer_step", lambda self, *a: steps.append(1) or original(self, *a)
    )
    with caplog.at_level(logging.WARNING, logger="diffquant.methods.progress"):
        run("accuquant", tiny5, cfg, cache, monkeypatch)
    assert "ignoring the accuquant calibration progress" in caplog.text and "start" in caplog.text
    assert len(steps) == cfg.epochs * 3 * cfg.iters_per_group  # started over


# ---------------------------------------------------------------------------- QuEST
CALIB = CalibSettings(n_samples=4, step_stride=2, batch_size=4)
PTQ = PTQConfig(
    calib=CALIB,
    act_init_rows=16,
    act_init_batch_size=8,
    recon=ReconSettings(weight_iters=2, act_iters=1, batch_size=4, capture_batch_size=8),
)


def quest_cfg(**kw) -> QuestConfig:
    # 12 training rows (4 per recorded step), 3 optimiser steps per epoch
    return QuestConfig(
        **{
            "ptq": PTQ,
            "critical_layers": ["attentions.*to_q"],
            "tla_epochs": 2,
            "cma_epochs": 2,
            "samples_per_step": 4,
            "batch_size": 4,
            "eval_rows": 8,
            "timestep_init_rows": None,
            "weight_lr": 1e-3,
            "act_lr": 1e-3,
            "progress_every": 2,
            "guard_samples": 4,
            **kw,
        }
    )


def tiny6() -> TinyDiffusion:
    return TinyDiffusion(steps=6)


# saves: TLA step 2 (mid epoch 0), epoch 0, step 4, epoch 1 (TLA done), then the same for CMA
@pytest.mark.parametrize("kills", [(3, 3), (4,)], ids=["tla-mid-epoch,cma-epoch", "tla-done"])
def test_quest_resumes_bit_identically(kills, tmp_path, monkeypatch, caplog):
    cfg = quest_cfg()
    cache = tmp_path / "cache"
    uninterrupted = run("quest", tiny6, cfg, cache, monkeypatch)
    assert uninterrupted["metrics"]["quest_eps_mse_final"] is not None
    # the killed and resumed jobs load the cached PTQ base, the uninterrupted one computed it
    shutil.rmtree(cache / "quest")
    resumed = kill_and_resume("quest", tiny6, cfg, cache, monkeypatch, caplog, kills)
    assert_same(resumed, uninterrupted)


def test_quest_eps_mse_is_none_without_held_out_rows(tmp_path, monkeypatch):
    """``quest_eps_mse_*`` measure nothing (None, not 0.0) when no calibration row is held out."""
    out = run(
        "quest", tiny6, quest_cfg(eval_rows=0, cma=False, tla_epochs=1), tmp_path / "cache", monkeypatch
    )
    m = out["metrics"]
    assert m["quest_eps_mse_ptq"] is None and m["quest_eps_mse_init"] is None
    assert m["quest_eps_mse_final"] is None and m["tla_steps"] == 3
    # every row of each step trained on: no row left to hold out either
    cached = run(
        "quest",
        tiny6,
        quest_cfg(samples_per_step=8, cma=False, tla_epochs=1),
        tmp_path / "cache",
        monkeypatch,
    )["metrics"]
    assert cached["train_rows"] == 24 and cached["quest_eps_mse_final"] is None


# ---------------------------------------------------------------------------- the folder
def test_a_failed_save_keeps_the_previous_progress(tmp_path, monkeypatch, caplog):
    ckpt = Checkpointer(tmp_path, {"a": 1})
    ckpt.save({"x": torch.arange(3)}, "one")

    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(progress_mod, "atomic_torch_save", full_disk)
    with pytest.raises(OSError):
        ckpt.save({"x": torch.arange(4)}, "two")
    monkeypatch.undo()
    assert torch.equal(Checkpointer(tmp_path, {"a": 1}).load()["x"], torch.arange(3))
    # another fingerprint or an unreadable state: ignored with a warning
    with caplog.at_level(logging.WARNING, logger="diffquant.methods.progress"):
        assert Checkpointer(tmp_path, {"a": 2}).load() is None
        for f in tmp_path.glob("train_state_*.pt"):
            f.write_bytes(b"garbage")
        assert Checkpointer(tmp_path, {"a": 1}).load() is None
    assert "differing: a" in caplog.text and "unreadable" in caplog.text
    ckpt = Checkpointer(tmp_path, {"a": 1})
    ckpt.save({"x": torch.arange(5)}, "three")
    assert [f.name for f in tmp_path.glob("train_state_*.pt")] == ["train_state_000001.pt"]


# ---------------------------------------------------------------------------- a real kill
SMALL_QUEST = [
    "quant=w4a4",
    "method=quest",
    "logger=none",
    "evaluator.n_samples=10",
    "evaluator.batch_size=10",
    "method.ptq.calib.n_samples=4",
    "method.ptq.calib.step_stride=5",
    "method.ptq.act_init_rows=16",
    "method.ptq.recon.weight_iters=2",
    "method.ptq.recon.act_iters=1",
    "method.ptq.recon.max_rows=16",
    "method.samples_per_step=4",
    "method.batch_size=8",
    "method.tla_epochs=2",
    "method.cma_epochs=8",
    "method.eval_rows=8",
    "method.timestep_init_rows=16",
    "method.progress_every=1",
]


def _cli(args: list[str], log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), *args],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _metrics(run_dir: Path) -> dict:
    skip = ("peak_rss_mb", "peak_cuda_mb")
    return {
        k: v
        for k, v in json.loads((run_dir / "metrics.json").read_text()).items()
        if not k.endswith("_s") and k not in skip
    }


@pytest.mark.slow
def test_sigkilled_quest_job_resumes_with_the_same_metrics(tmp_path):
    a = _cli(
        [*SMALL_QUEST, f"paths.cache_dir={tmp_path}/a", f"hydra.run.dir={tmp_path}/run_a"], tmp_path / "a.log"
    )
    assert a.wait(timeout=600) == 0, (tmp_path / "a.log").read_text()[-3000:]

    cache = tmp_path / "b"
    job = _cli(
        [*SMALL_QUEST, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path}/run_b"], tmp_path / "b1.log"
    )
    deadline = time.monotonic() + 600
    while not list(cache.glob("quest/*.partial/train_progress.json")):
        assert job.poll() is None, (tmp_path / "b1.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    assert job.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "run_b" / "metrics.json").exists()

    again = _cli(
        [*SMALL_QUEST, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path}/run_b"], tmp_path / "b2.log"
    )
    log = tmp_path / "b2.log"
    assert again.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert "resuming QuEST finetuning" in log.read_text()
    assert _metrics(tmp_path / "run_b") == _metrics(tmp_path / "run_a")


def test_saves_within_a_phase_keep_their_overhead_small(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_mod, "MAX_OVERHEAD", 0.05)
    ckpt = Checkpointer(tmp_path, {}, every=2)
    assert ckpt.due(2) and not ckpt.due(3) and not Checkpointer(None, {}, every=2).due(2)
    assert not Checkpointer(tmp_path, {}, every=0).due(2)
    ckpt.save({}, "x")
    ckpt._last = (1.0, time.perf_counter())  # a save of 1 s, just now: not again yet
    assert not ckpt.due(4)
    ckpt._last = (1.0, time.perf_counter() - 30)  # 30 s ago: 1/30 < 5 %
    assert ckpt.due(4)


def test_saved_sample_batches_are_keyed_by_the_denoisers_numbers():
    """A job restarted in the same run folder replays its saved sample batches only if it samples
    with the same numbers: the progress key is the configuration's hash and a digest of the
    denoiser's parameters and buffers (one changed weight, e.g. a method whose code changed,
    gives another key; the same numbers give the same key)."""
    from types import SimpleNamespace

    from diffquant.app import sampling_key
    from tiny_models import TinyDiffusion

    model, job = TinyDiffusion(), SimpleNamespace(config_hash="abc")
    key = sampling_key(job, model)
    assert sampling_key(job, TinyDiffusion()) == key  # same numbers, another instance
    assert sampling_key(SimpleNamespace(config_hash="abd"), model) != key
    weight = next(model.denoiser.parameters())
    original = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[0] += 1e-6
    assert sampling_key(job, model) != key
    with torch.no_grad():
        weight.copy_(original)
    assert sampling_key(job, model) == key
