"""Calibration data (collect, cache, stream), block reconstruction, checkpoints, resume and the
``ptq`` / ``ptq_minmax`` methods on a tiny class-conditional latent model with guidance."""

import collections
import dataclasses
import importlib
import io
import json
import logging
import sys

import pytest
import torch

from diffquant.cache import atomic_torch_save, file_digest
from diffquant.calib import (
    CalibSettings,
    ReconSettings,
    calibrate_act_ranges,
    collect_calibration,
    find_units,
    reconstruct,
)
from diffquant.context import RunContext
from diffquant.methods.ptq import PTQConfig, PTQMinMaxConfig, load_or_run_ptq
from diffquant.methods.result_cache import run_method
from diffquant.models.denoiser import UNET
from diffquant.quant import (
    QuantConfig,
    load_quantized,
    quant_state,
    quantize_denoiser,
    quantizer_state_dict,
    save_quantized,
)
from diffquant.quant.state import iter_quantizers
from diffquant.quant.typed import key_dict
from diffquant.registry import METHODS
from diffquant.schema import typed_run_config, validate
from diffquant.validation import ConfigError, InvalidSetting
from tiny_models import N_CLASSES, TinyDiffusion, TinyTextDiffusion

torch.set_num_threads(1)
recon_module = importlib.import_module("diffquant.calib.reconstruct")  # the function shadows it

CALIB = CalibSettings(n_samples=6, step_stride=2, batch_size=4, shard_rows=10)
RECON = ReconSettings(weight_iters=24, act_iters=12, batch_size=8, capture_batch_size=16)
W4A8 = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def stream(cache):
    return collect_calibration(TinyDiffusion(), CALIB, cache)


def _rows_close(unet_a, unet_b, stream, atol=0.0):
    batch = next(stream.batches(12, stream.subset(12, 5)))
    with torch.no_grad():
        a, b = UNET.forward(unet_a, batch), UNET.forward(unet_b, batch)
    return torch.allclose(a, b, atol=atol) if atol else torch.equal(a, b)


def test_calibration_rows_cover_the_trajectories(stream, cache, monkeypatch):
    model = TinyDiffusion()
    steps = list(range(0, 6, CALIB.step_stride))
    assert len(stream) == CALIB.n_samples * len(steps) * 2  # guidance: uncond + cond rows
    assert json.loads((stream.path / "index.json").read_text())["steps"] == steps
    assert len(list(stream.path.glob("shard_*.pt"))) > 1  # sharded, streamed
    seen = torch.cat([b["_step"] for b in stream.batches(7, with_step=True)])
    assert seen.numel() == len(stream)
    batch = next(stream.batches(1000, with_step=True))
    assert set(batch) == {"sample", "timestep", "class_labels", "_step"}
    assert torch.equal(batch["timestep"], model.timesteps[batch["_step"]])
    n_null = int((batch["class_labels"] == N_CLASSES).sum())
    assert n_null == len(stream) // 2  # the unconditional half
    sub = stream.subset(10, seed=1)
    assert sum(b["sample"].shape[0] for b in stream.batches(3, sub)) == 10

    # the second request is served from the cache: no sampling
    monkeypatch.setattr(
        TinyDiffusion, "sample_latents", lambda *a, **k: pytest.fail("calibration data was recomputed")
    )
    again = collect_calibration(TinyDiffusion(), CALIB, cache)
    assert again.path == stream.path


def test_units_follow_execution_order(stream):
    model = TinyDiffusion()
    quantize_denoiser(model.denoiser, model.spec, W4A8)
    units = find_units(model.denoiser, model.spec, next(stream.batches(2)))
    names = [u.name for u in units]
    assert names[:3] == ["time_embedding.linear_1", "time_embedding.linear_2", "conv_in"]
    assert names[-1] == "conv_out"
    kinds = {u.kind for u in units}
    assert kinds == {"layer", "resnet", "attention"}
    assert "down_blocks.1.attentions.0" in names and "up_blocks.0.resnets.1" in names
    assert not any(n.startswith("down_blocks.1.attentions.0.") for n in names)


def _calibrated(stream, progress_dir=None, on_unit_done=None, recon=RECON):
    model = TinyDiffusion()
    quantize_denoiser(model.denoiser, model.spec, W4A8, timesteps=model.timesteps)
    calibrate_act_ranges(model.denoiser, stream, method="lp", n_rows=24, batch_size=12)
    report = reconstruct(
        model.denoiser, model.spec, stream, recon, progress_dir=progress_dir, on_unit_done=on_unit_done
    )
    return model, report


def _error_to_fp(model, stream, fp_model=None) -> torch.Tensor:
    """Mean squared difference between ``model``'s outputs on every calibration row and the FP
    outputs of ``fp_model`` (default ``model`` itself, quantizers off)."""
    fp_model = model if fp_model is None else fp_model
    batch = next(stream.batches(len(stream)))
    with torch.no_grad():
        with quant_state(fp_model.denoiser, weights=False, acts=False):
            fp = fp_model.spec.forward(fp_model.denoiser, batch)
        return (model.spec.forward(model.denoiser, batch) - fp).pow(2).mean()


def test_reconstruction_beats_initial_ranges_and_roundtrips(stream, tmp_path):
    minmax = TinyDiffusion()
    quantize_denoiser(minmax.denoiser, minmax.spec, W4A8)
    calibrate_act_ranges(minmax.denoiser, stream, method="lp", n_rows=24, batch_size=12)
    model, report = _calibrated(stream)
    assert len(report.units) == 18 and all(u.weight_loss is not None for u in report.units)

    assert _error_to_fp(model, stream) < _error_to_fp(minmax, stream, fp_model=model)

    path = save_quantized(model.denoiser, tmp_path / "q.pt", W4A8, meta={"x": 1})
    fresh = TinyDiffusion()
    summary, meta = load_quantized(fresh.denoiser, fresh.spec, path)
    assert meta == {"x": 1} and summary.n_quant_layers == 51
    assert _rows_close(model.denoiser, fresh.denoiser, stream)  # identical outputs


def test_resume_after_interruption_matches_uninterrupted(stream, tmp_path):
    full, _ = _calibrated(stream, progress_dir=tmp_path / "a")

    class Stop(Exception):
        pass

    def stop_after_5(i, report):
        if i == 4:
            raise Stop

    with pytest.raises(Stop):
        _calibrated(stream, progress_dir=tmp_path / "b", on_unit_done=stop_after_5)
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["done"] == 5
    resumed, report = _calibrated(stream, progress_dir=tmp_path / "b")
    assert report.resumed_from == 5 and len(report.units) == 18
    assert _rows_close(full.denoiser, resumed.denoiser, stream)
    full_state, resumed_state = quantizer_state_dict(full.denoiser), quantizer_state_dict(resumed.denoiser)
    assert full_state.keys() == resumed_state.keys()
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)  # bit for bit


def test_progress_writes_each_unit_once(stream, tmp_path):
    """The base state once, then per unit only its own quantizers: the bytes written stay about
    twice one state, not (units x state)."""
    model, report = _calibrated(stream, progress_dir=tmp_path)
    index = json.loads((tmp_path / "progress.json").read_text())
    names = [u.name for u in report.units]
    assert index["done"] == 18 and index["unit_states"] == [f"unit_{i:04d}.pt" for i in range(1, 19)]
    full = quantizer_state_dict(model.denoiser)
    base = torch.load(tmp_path / "state_base.pt", weights_only=True)
    assert base.keys() == {k for k in full if not k.endswith("round_up")}  # before any AdaRound
    covered = set()
    for unit, file in zip(names, index["unit_states"]):
        state = torch.load(tmp_path / file, weights_only=True)
        assert state and all(k.startswith(f"{unit}.") for k in state), unit
        assert all(torch.equal(state[k], full[k]) for k in state)  # units never overwrite each other
        covered |= set(state)
    # what no unit reconstructs kept its base value
    assert all(torch.equal(base[k], full[k]) for k in full.keys() - covered)
    assert covered >= {k for k in full if k.endswith("round_up")}
    size = lambda d: sum(v.numel() * v.element_size() for v in d.values())  # noqa: E731
    unit_bytes = sum(size(torch.load(tmp_path / f, weights_only=True)) for f in index["unit_states"])
    assert unit_bytes <= size(full)


def test_progress_files_are_written_once_and_total_one_state(stream, tmp_path, monkeypatch):
    """Every progress file is written once (base, then one per unit), and the bytes written over
    the run are about one final state, not (units x state)."""
    written = []

    def counting_save(obj, path):
        atomic_torch_save(obj, path)
        written.append((path.name, path.stat().st_size))

    monkeypatch.setattr(recon_module, "atomic_torch_save", counting_save)
    model, report = _calibrated(
        stream, progress_dir=tmp_path, recon=dataclasses.replace(RECON, weight_iters=2, act_iters=2)
    )
    names = [n for n, _ in written]
    assert names == ["state_base.pt"] + [f"unit_{i:04d}.pt" for i in range(1, 19)]  # each once
    one_state = io.BytesIO()
    torch.save(quantizer_state_dict(model.denoiser), one_state)
    full = len(one_state.getvalue())
    unit_bytes = sum(b for n, b in written if n != "state_base.pt")
    assert unit_bytes <= 1.1 * full  # the units' files together: one state (+ per-file overhead)
    assert sum(b for _, b in written) < 2 * full  # and the base (no rounding choices yet)
    index = json.loads((tmp_path / "progress.json").read_text())
    assert set(index["digests"]) == set(names)  # each file's SHA-256, checked on resume
    assert all(file_digest(tmp_path / n) == index["digests"][n] for n in names)


def _interrupted(stream, folder, after, recon=RECON):
    """A run stopped after ``after`` finished units (progress in ``folder``)."""

    class Stop(Exception):
        pass

    def stop(i, report):
        if i == after - 1:
            raise Stop

    with pytest.raises(Stop):
        _calibrated(stream, progress_dir=folder, on_unit_done=stop, recon=recon)


SHORT = dataclasses.replace(RECON, weight_iters=6, act_iters=3)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_corrupt_unit_file_is_redone_from_that_unit(stream, tmp_path, damage, caplog):
    """Progress files are checked against the SHA-256 the index recorded: a partial, corrupt or
    missing unit file resumes before that unit (it and the later ones are redone) with a warning
    naming the file; the result is bit for bit the uninterrupted one."""
    full, _ = _calibrated(stream, progress_dir=tmp_path / "a", recon=SHORT)
    _interrupted(stream, tmp_path / "b", after=6, recon=SHORT)
    bad = tmp_path / "b" / "unit_0004.pt"
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, loads or not: only the digest tells
        bad.write_bytes(data[:-40] + bytes(b ^ 0xFF for b in data[-40:-39]) + data[-39:])
    else:
        bad.unlink()
    with caplog.at_level(logging.WARNING, logger="diffquant.calib.reconstruct"):
        resumed, report = _calibrated(stream, progress_dir=tmp_path / "b", recon=SHORT)
    assert "unit_0004.pt is unusable" in caplog.text and "redone" in caplog.text
    assert report.resumed_from == 3 and len(report.units) == 18
    full_state, resumed_state = quantizer_state_dict(full.denoiser), quantizer_state_dict(resumed.denoiser)
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)


def test_a_corrupt_base_starts_over(stream, tmp_path, caplog):
    _interrupted(stream, tmp_path, after=2, recon=SHORT)
    base = tmp_path / "state_base.pt"
    base.write_bytes(base.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="diffquant.calib.reconstruct"):
        _, report = _calibrated(stream, progress_dir=tmp_path, recon=SHORT)
    assert "state_base.pt is unusable" in caplog.text
    assert report.resumed_from == 0 and len(report.units) == 18


def test_captures_are_deleted_after_each_unit(stream, tmp_path, monkeypatch):
    """A unit's disk shards exist while it is reconstructed and are gone when it ends (so the
    disk used does not grow with the units); shards a killed run left are removed at start."""
    init = recon_module.RowStore.__init__
    monkeypatch.setattr(recon_module.RowStore, "__init__", lambda self, d, b: init(self, d, 20_000))
    shards = []
    spill = recon_module.RowStore._spill

    def counting_spill(self):
        spill(self)
        shards.append(self.shards[-1][0])

    monkeypatch.setattr(recon_module.RowStore, "_spill", counting_spill)
    stale = tmp_path / "recon_killed"
    stale.mkdir(parents=True)
    (stale / "rows_00000.pt").write_bytes(b"x" * 1000)
    left = []

    def check(i, report):
        left.append(sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("recon_")))

    _calibrated(stream, progress_dir=tmp_path, on_unit_done=check, recon=SHORT)
    assert len(shards) > 18 and all(p.parent.name.startswith("recon_") for p in shards)
    assert not any(p.exists() for p in shards)
    assert left == [[]] * 18  # nothing of a finished unit left (the stale folder removed first)


def test_each_stage_reads_only_its_inputs(stream, monkeypatch):
    """The weight stage gets the quantized network's inputs ``w_*`` and the target, the activation
    stage the FP network's ``fp_*`` and the target (no time steps: no router here)."""
    sample = recon_module.RowStore.sample
    seen = []

    def spy(self, *a, **k):
        for batch in sample(self, *a, **k):
            seen.append(frozenset(batch))
            yield batch

    monkeypatch.setattr(recon_module.RowStore, "sample", spy)
    _calibrated(stream, recon=dataclasses.replace(RECON, weight_iters=2, act_iters=2))
    assert seen and {"y", "t", "step"} - set().union(*seen) == {"t", "step"}
    for keys in seen:
        ins = keys - {"y"}
        assert "y" in keys and ins, keys
        assert all(k.startswith("w_") for k in ins) or all(k.startswith("fp_") for k in ins), keys
    assert any(k.startswith("w_") for k in set().union(*seen))


def test_no_host_reads_inside_the_iteration_loops(stream, monkeypatch):
    """Inside the stages, reconstruct.py reads no tensor to the host (``item``, ``bool``,
    ``tolist``) but in :class:`_LossLog`, once per LOSS_READ_EVERY iterations and at the end."""
    reads = collections.Counter()
    for name in ("item", "__bool__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            caller = sys._getframe(1).f_code
            if caller.co_filename == recon_module.__file__:
                reads[caller.co_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    calls = collections.Counter()
    read = recon_module._LossLog._read
    monkeypatch.setattr(
        recon_module._LossLog, "_read", lambda self: calls.update([bool(self.pending)]) or read(self)
    )
    _calibrated(stream, recon=dataclasses.replace(RECON, weight_iters=110, act_iters=3, max_rows=16))
    assert not {"_weight_stage", "_act_stage", "_joint_stage"} & set(reads), reads
    # per unit: weight 110 iterations = reads after 50 and 100 and at the end; act: at the end
    assert calls[True] == 18 * 3 + 18
    assert reads["_read"] == calls[True]  # one tolist per read


def test_disk_budget_caps_the_rows_of_a_large_unit(stream, tmp_path, caplog):
    """``disk_budget_gb``: a unit whose rows would take more than it (and more than memory_mb)
    is reconstructed on the first N rows of a seeded permutation; a warning names the setting and
    N; the other units use every row."""
    rows = {}
    recon = dataclasses.replace(SHORT, memory_mb=1, disk_budget_gb=0.0)  # limit: 1 MB

    orig = recon_module.Reconstructor._capture

    def spy(self, unit, *a, **k):
        store, spec = orig(self, unit, *a, **k)
        rows[unit.name] = (store.n_rows, store.bytes, len(self.rows))
        return store, spec

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING, "diffquant.calib.reconstruct"):
        mp.setattr(recon_module.Reconstructor, "_capture", spy)
        capped, _ = _calibrated(stream, progress_dir=tmp_path / "a", recon=recon)
    limit = 2**20
    big = [n for n, (kept, _, total) in rows.items() if kept < total]
    assert big and len(big) < len(rows)
    assert all(b <= limit for _, b, _ in rows.values())
    assert all(kept == total for n, (kept, _, total) in rows.items() if n not in big)
    for name in big:
        kept = rows[name][0]
        assert f"unit {name}:" in caplog.text
        assert f"method.recon.disk_budget_gb=0.0: reconstructing it on {kept} rows" in caplog.text
    # deterministic: the same rows and result again; unbounded, the large units differ
    again, _ = _calibrated(stream, recon=recon)
    unbounded, _ = _calibrated(stream, recon=dataclasses.replace(recon, disk_budget_gb=None))
    a, b, c = (quantizer_state_dict(m.denoiser) for m in (capped, again, unbounded))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith(f"{big[0]}."))


def test_disk_budget_subset_is_nested_and_in_stream_order(stream):
    model = TinyDiffusion()
    quantize_denoiser(model.denoiser, model.spec, W4A8)
    r = recon_module.Reconstructor(
        model.denoiser, model.spec, stream, dataclasses.replace(RECON, disk_budget_gb=1.0)
    )
    small, large = r.budget_rows(5), r.budget_rows(20)
    assert torch.equal(small, small.sort().values) and set(small.tolist()) <= set(large.tolist())
    assert len(set(large.tolist())) == 20 and not torch.equal(large, r.rows[:20])  # not the first 20
    # N from the measured row size: 4 MiB rows, limit max(1 GB, memory_mb 1 MB) -> 256 rows
    r.s = dataclasses.replace(RECON, disk_budget_gb=1.0, memory_mb=1)
    unit = recon_module.Unit("u", torch.nn.Identity(), "layer")
    big_rows = {"fp_a0": torch.zeros(2, 2**20), "y": torch.zeros(2, 0)}
    assert r._rows_that_fit(unit, big_rows, 256) is None and r._rows_that_fit(unit, big_rows, 257) == 256
    r.s = dataclasses.replace(RECON, disk_budget_gb=0.001, memory_mb=1)
    with pytest.raises(InvalidSetting, match="holds no row of unit u .*4.00 MB a row"):
        r._rows_that_fit(unit, big_rows, 10)


@pytest.mark.parametrize("value", [-1, -0.5, float("nan")])
def test_disk_budget_refuses_bad_values(value, make_cfg):
    with pytest.raises(InvalidSetting, match="disk_budget_gb is not a disk size"):
        ReconSettings(disk_budget_gb=value)
    with pytest.raises(ConfigError, match=r"method\.recon\.disk_budget_gb=\S+ is not a disk size"):
        validate(make_cfg(["quant=w4a8", "method=ptq_paper", f"method.recon.disk_budget_gb={value}"]))


def test_disk_budget_in_the_paper_config(make_cfg):
    paper = typed_run_config(make_cfg(["quant=w4a8", "method=ptq_paper"])).method.recon
    assert paper.disk_budget_gb == 32.0
    assert typed_run_config(make_cfg(["quant=w4a8", "method=ptq"])).method.recon.disk_budget_gb is None
    assert "disk_budget_gb" not in key_dict(ReconSettings())  # null: cache keys unchanged


def test_divergence_names_the_fix(stream, monkeypatch):
    """A NaN loss is reported (unit, stage, the learning rate to lower) when the losses are read:
    every LOSS_READ_EVERY iterations and at the end of a stage, not at every iteration."""
    assert recon_module.LOSS_READ_EVERY == 50
    calls = []

    def nan_loss(pred, target, *a):  # NaN from the 3rd call on: a loss with a gradient
        calls.append(1)
        return (pred - target).pow(2).mean() * (float("nan") if len(calls) >= 3 else 1.0)

    monkeypatch.setattr(recon_module, "lp_loss", nan_loss)
    recon = dataclasses.replace(RECON, weight_iters=120)
    with pytest.raises(
        FloatingPointError, match=r"diverged in the weight stage at iteration 2 .*method\.recon\.weight_lr"
    ):
        _calibrated(stream, recon=recon)
    assert len(calls) == 50  # read (and raised) after the first 50 iterations, not at the 3rd
    calls.clear()
    with pytest.raises(FloatingPointError, match="time_embedding.linear_1 diverged in the weight stage"):
        _calibrated(stream, recon=dataclasses.replace(RECON, weight_iters=10))
    assert len(calls) == 10  # a stage shorter than LOSS_READ_EVERY is checked at its end
    calls.clear()
    with pytest.raises(FloatingPointError, match=r"in the act stage .*method\.recon\.act_lr"):
        _calibrated(stream, recon=dataclasses.replace(RECON, weight_iters=0))


def test_ptq_methods_cache_and_metrics(cache, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ctx = RunContext(run_dir=run_dir, cache_dir=cache, device=torch.device("cpu"))
    ptq = PTQConfig(
        calib=CALIB,
        recon=dataclasses.replace(RECON, weight_iters=8, act_iters=4),
        act_init_rows=24,
        save_checkpoint=True,
    )
    first = load_or_run_ptq(TinyDiffusion(), W4A8, ptq, ctx)
    model, metrics = first.model, first.metrics
    assert metrics["n_quant_layers"] == 51 and metrics["ptq_cached"] is False
    assert metrics["recon_units"] == 18 and (run_dir / "quantized_denoiser.pt").exists()
    assert first.quant == W4A8 and len(first.tables["recon_units"].rows) == 18

    ctx2 = RunContext(run_dir=run_dir, cache_dir=cache, device=torch.device("cpu"))
    again = load_or_run_ptq(TinyDiffusion(), W4A8, ptq, ctx2)
    assert again.metrics["ptq_cached"] is True
    assert again.metrics["ptq_calib_s"] == metrics["ptq_calib_s"]
    assert again.quant == first.quant and again.tables == first.tables
    stream = collect_calibration(TinyDiffusion(), CALIB, cache)
    assert _rows_close(model.denoiser, again.model.denoiser, stream)

    ctx3 = RunContext(run_dir=run_dir, cache_dir=cache, device=torch.device("cpu"))
    floor = run_method(METHODS.get("ptq_minmax")(), TinyDiffusion(), W4A8, PTQMinMaxConfig(calib=CALIB), ctx3)
    assert floor.metrics["n_quant_layers"] == 51 and "recon_units" not in floor.metrics
    assert floor.metrics["ptq_minmax_cached"] is False
    assert floor.model.denoiser.conv_in.weight_quantizer.rounding == "nearest"
    assert model.denoiser.conv_in.weight_quantizer.rounding == "hard"


def test_reconstruction_of_cross_attention_unet(tmp_path):
    model = TinyTextDiffusion()
    stream = collect_calibration(model, CalibSettings(n_samples=4, step_stride=2), tmp_path)
    quantize_denoiser(model.denoiser, model.spec, W4A8)
    calibrate_act_ranges(model.denoiser, stream, n_rows=16, batch_size=16)
    report = reconstruct(
        model.denoiser, model.spec, stream, dataclasses.replace(RECON, weight_iters=6, act_iters=4)
    )
    kinds = {u.name: u.kind for u in report.units}
    assert "down_blocks.0.attentions.0.transformer_blocks.0" in kinds
    assert kinds["down_blocks.0.attentions.0.proj_in"] == "layer"
    assert set(kinds.values()) == {"layer", "resnet", "transformer"}
    assert all(u.act_loss is not None and u.act_loss == u.act_loss for u in report.units)


def test_time_step_only_inputs_get_minmax_ranges(stream):
    """``minmax_layers`` overrides the L_p search for the quantizers it names, and only those."""
    ranges = {}
    for forced in ((), (r"time_embedding\.",)):
        model = TinyDiffusion()
        quantize_denoiser(model.denoiser, model.spec, QuantConfig(name="w8a4", weight_bits=8, act_bits=4))
        calibrate_act_ranges(
            model.denoiser, stream, method="lp", n_rows=24, batch_size=12, minmax_layers=forced
        )
        ranges[forced] = {
            n: (q.scale.detach().clone(), q.zero_point.detach().clone())
            for n, q in iter_quantizers(model.denoiser, "act")
        }
    lp, forced = ranges[()], ranges[(r"time_embedding\.",)]
    temb = [n for n in lp if n.startswith("time_embedding.")]
    assert temb and all(torch.equal(lp[n][0], forced[n][0]) for n in lp if n not in temb)
    # min-max never clips, so its step is at least the L_p search's (which clips the tails)
    assert all((forced[n][0] >= lp[n][0] - 1e-7).all() for n in temb)
    assert any((forced[n][0] > lp[n][0] * 1.01).any() for n in temb)


def test_cache_keys_name_the_numerics():
    """Results differ with the CPU thread count (summation order), the CPU capability torch
    dispatches on and the torch version, so cache keys include them."""
    from diffquant.calib.collect import calib_cache_key

    model, threads = TinyDiffusion(), torch.get_num_threads()
    key = calib_cache_key(model, CALIB)
    assert key["model"]["numerics"] == {
        "device": "cpu",
        "cpu_threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }
    try:
        torch.set_num_threads(threads + 1)
        assert calib_cache_key(model, CALIB) != key
    finally:
        torch.set_num_threads(threads)
    assert calib_cache_key(model, CALIB) == key


def test_compiled_adaround_reconstructs_as_the_eager_kernels(stream, monkeypatch):
    """``compile``: the weight stages run AdaRound's compiled kernels (the regulariser in the soft
    rounding's) and α's fused Adam, and the reconstruction agrees with the eager one to float rounding: the same final roundings but for a few weights
    whose α ends near 0, and the same error to FP within 2%."""
    from diffquant.quant import adaround

    calls = collections.Counter()
    real = adaround.compiled

    def spy(fn):
        calls[fn.__name__] += 1
        return real(fn)

    fused = []
    real_adam = torch.optim.Adam

    def adam(params, **kwargs):
        fused.append(kwargs.get("fused"))
        return real_adam(params, **kwargs)

    eager, _ = _calibrated(stream)
    monkeypatch.setattr(adaround, "compiled", spy)
    monkeypatch.setattr(torch.optim, "Adam", adam)
    fast, report = _calibrated(stream, recon=dataclasses.replace(RECON, compile=True))
    monkeypatch.undo()
    n_steps = len(report.units) and sum(u.weight_loss is not None for u in report.units) * RECON.weight_iters
    # warm-up iterations: the soft rounding alone; then with the regulariser in the same kernel
    assert calls["soft_quant_expr"] + calls["soft_quant_penalty_expr"] >= n_steps
    assert calls["soft_quant_penalty_expr"] > 0 and calls["regularizer_expr"] == 0
    assert True in fused  # α's Adam: the fused kernel (the LSQ stage's step sizes: not)
    masks = {
        name: (q.round_up, dict(fast.denoiser.named_modules())[name].round_up)
        for name, q in eager.denoiser.named_modules()
        if getattr(q, "round_up", None) is not None
    }
    assert masks
    differ = sum(int((a != b).sum()) for a, b in masks.values())
    assert differ <= 0.001 * sum(a.numel() for a, _ in masks.values())
    err_eager, err_fast = _error_to_fp(eager, stream), _error_to_fp(fast, stream, fp_model=eager)
    assert abs(float(err_fast / err_eager) - 1) < 0.02


def test_bf16_autocast_runs_the_unit_forward_in_bf16(stream, monkeypatch):
    """``autocast=bf16``: the stages' unit forwards run under bfloat16 autocast (the convolutions
    see bf16 inputs), the result differs from FP32 and still beats the initial ranges."""
    import dataclasses

    with pytest.raises(InvalidSetting, match="autocast"):
        ReconSettings(autocast="fp16")
    dtypes: list[torch.dtype] = []
    real_conv = torch.nn.functional.conv2d

    def spy(x, *args, **kwargs):
        dtypes.append(x.dtype)
        return real_conv(x, *args, **kwargs)

    fp32, _ = _calibrated(stream)
    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    bf16, report = _calibrated(stream, recon=dataclasses.replace(RECON, autocast="bf16"))
    monkeypatch.undo()
    assert torch.bfloat16 in dtypes and all(u.weight_loss is not None for u in report.units)
    err_fp32, err_bf16 = _error_to_fp(fp32, stream), _error_to_fp(bf16, stream, fp_model=fp32)
    assert err_bf16 != err_fp32 and err_bf16 < 2 * err_fp32
