"""Fidelity to the reference code: the Q-Diffusion / BRECQ settings ``ptq_paper`` reproduces, the
golden-config check of ``experiments/FIDELITY.md``, and every paper experiment's baseline row end
to end at tiny scale.

* behaviour: ``calib.n_steps`` selects steps as Q-Diffusion's ``get_train_samples``; running
  statistics are the EMA of per-batch min/max (hand-computed); the reference row order; the loss
  axis; the two-pass (Q-Diffusion) reconstruction order equals the unit-by-unit one;
  ``act_init_stage=after_weights`` initialises on the weight-quantized network from the first rows;
  ``quant_overrides`` apply to the PTQ row and not to a method built on it.
* the ledger: every ``key=value`` in the "ours" column of a table of ``experiments/FIDELITY.md``
  equals the composed config of that experiment and method (``quant.*``: the quant config the row
  quantizes with, i.e. the experiment's ``quant`` with the method's ``quant_overrides``, which
  QuEST and AccuQuant have none of; ``derived.*``: computed below), and every (experiment, grid
  method) pair has a section with a table: the Q-Diffusion, QuEST and AccuQuant rows alike.
* end to end: ``run.py experiment=<each>`` with its baseline row (``ptq_paper`` /
  ``ptq_paper_sd``; ``ptq`` for ``embedded_digits``) on tiny random components of the real classes.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import CONF, ROOT
from diffquant.calib import CalibSettings, ReconSettings, collect_calibration, reconstruct
from diffquant.calib.collect import CalibStream, calib_cache_key
from diffquant.calib.ranges import RunningStat, calibrate_act_ranges
from diffquant.calib.reconstruct import lp_loss
from diffquant.context import RunContext
from diffquant.methods.ptq import PTQConfig, load_or_run_ptq, method_quant
from diffquant.methods.result_cache import run_method
from diffquant.quant import QuantConfig, quantize_denoiser
from diffquant.quant.checkpoint import quantizer_state_dict
from diffquant.quant.quantizers import ActQuantizer, range_to_qparams
from diffquant.quant.state import iter_quantizers
from diffquant.registry import METHODS
from diffquant.schema import typed_run_config
from diffquant.validation import ConfigError, InvalidSetting
from tiny_models import N_CLASSES, TinyDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")

LEDGER = ROOT / "experiments" / "FIDELITY.md"
CALIB = CalibSettings(n_samples=6, step_stride=2, batch_size=4, shard_rows=10)
W4A8 = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def stream(cache) -> CalibStream:
    return collect_calibration(TinyDiffusion(), CALIB, cache)


# ============================================================================ 1. calibration steps
@pytest.mark.parametrize(
    "nsteps,cali_st", [(200, 20), (500, 20), (400, 20), (20, 20), (51, 25), (50, 25), (7, 3), (100, 1)]
)
def test_n_steps_is_qdiffusion_get_train_samples(nsteps, cali_st):
    """q-diffusion qdiff/utils.py:335: ``timesteps = list(range(0, nsteps, nsteps//num_st))``."""
    s = CalibSettings(n_steps=cali_st)
    assert s.recorded_steps(nsteps) == list(range(0, nsteps, nsteps // cali_st))
    assert s.stride(nsteps) == nsteps // cali_st


def test_n_steps_examples_and_limits():
    assert CalibSettings(n_steps=20).recorded_steps(200) == list(range(0, 200, 10))
    assert len(CalibSettings(n_steps=20).recorded_steps(500)) == 20  # every 25th
    assert CalibSettings(n_steps=25).recorded_steps(51) == list(range(0, 51, 2))  # 26: 0 .. 50
    assert CalibSettings(n_steps=20, step_stride=7).stride(20) == 1  # n_steps wins over stride
    with pytest.raises(InvalidSetting, match="n_steps"):
        CalibSettings(n_steps=30).stride(20)
    with pytest.raises(InvalidSetting, match="n_steps"):
        CalibSettings(n_steps=0)


def test_n_steps_records_the_same_rows_as_the_stride_it_selects(stream, cache, monkeypatch):
    """n_steps=3 of 6 sampler steps = stride 2: the same cache entry (no recollection)."""
    model = TinyDiffusion()
    by_count = dataclasses.replace(CALIB, n_steps=3, step_stride=5)
    assert calib_cache_key(model, by_count) == calib_cache_key(model, CALIB)
    monkeypatch.setattr(
        TinyDiffusion, "sample_latents", lambda *a, **k: pytest.fail("calibration data was recomputed")
    )
    assert collect_calibration(model, by_count, cache).path == stream.path
    assert stream.index["steps"] == [0, 2, 4]


# ============================================================================ reference row order
def test_reference_order_is_step_major_conditional_first(stream):
    """Q-Diffusion / QuEST concatenate per step (qdiff/utils.py:337-346): all rows of the first
    recorded step, then the next; with guidance the conditional block before the unconditional."""
    order = stream.reference_order()
    assert sorted(order.tolist()) == list(range(len(stream)))
    batch = next(stream.ordered_batches(len(stream), order, with_step=True))
    steps, labels = batch["_step"], batch["class_labels"]
    half = len(stream) // 2
    assert (labels[:half] != N_CLASSES).all() and (labels[half:] == N_CLASSES).all()
    for part in (slice(0, half), slice(half, None)):
        assert torch.equal(steps[part], steps[part].sort().values)  # time-step order
    n = CALIB.n_samples
    assert labels[:n].tolist() == [i % N_CLASSES for i in range(n)]  # trajectories in order


def test_reference_order_does_not_depend_on_the_sampling_batch(stream, tmp_path):
    other = collect_calibration(TinyDiffusion(), dataclasses.replace(CALIB, batch_size=5), tmp_path)
    a = next(stream.ordered_batches(1000, stream.reference_order(), with_step=True))
    b = next(other.ordered_batches(1000, other.reference_order(), with_step=True))
    assert set(a) == set(b)
    for k in ("_step", "timestep", "class_labels"):
        assert torch.equal(a[k], b[k])
    # the same trajectories (batched sampling changes the latents in the last float bits)
    assert torch.allclose(a["sample"], b["sample"], atol=1e-4)


def test_reference_order_of_a_set_written_before_the_layout_record(stream, tmp_path):
    """Sets cached by older code lack ``layout`` in their index: the order comes from the step
    column (the first denoiser call's size gives the sampling batch)."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(stream.path, old)
    index = json.loads((old / "index.json").read_text())
    index.pop("layout")
    (old / "index.json").write_text(json.dumps(index))
    assert torch.equal(CalibStream(old).reference_order(), stream.reference_order())


def test_ordered_batches_keep_any_order_across_shards(stream):
    perm = torch.randperm(len(stream), generator=torch.Generator().manual_seed(0))
    everything = next(stream.batches(1000, with_step=True))
    got = list(stream.ordered_batches(7, perm, with_step=True))
    assert [len(b["_step"]) for b in got] == [7] * (len(stream) // 7) + [len(stream) % 7]
    joined = {k: torch.cat([b[k] for b in got]) for k in got[0]}
    assert all(torch.equal(joined[k], everything[k][perm]) for k in everything)
    dropped = list(stream.ordered_batches(7, perm, drop_last=True))
    assert len(dropped) == len(stream) // 7


# ============================================================================ 2. running statistics
BATCHES = [  # (min, max) of each batch; the first one is the initial batch
    (-1.0, 2.0),
    (-1.0, 2.0),
    (-3.0, 1.0),
    (-2.0, 4.0),
]


def _batch(lo: float, hi: float) -> torch.Tensor:
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0, 0, 0], x[1, 2, 3, 3] = lo, hi
    return x


@pytest.mark.parametrize("mode", ["affine", "symmetric"])
@pytest.mark.parametrize("quantize", [False, True])
def test_running_stat_is_the_ema_of_batch_min_max(mode, quantize):
    """qdiff/quant_layer.py:91-110: x_min = 0.95 x_min + 0.05 min(batch), started from the
    initial batch's raw min / max; Δ from the EMA range. By hand for the batches above:
    lo: -1 → -1 → -1.1 → -1.145, hi: 2 → 2 → 1.95 → 2.0525."""
    q = ActQuantizer(8, mode)
    q.start_observing("lp", quantize=quantize)  # the init method is overwritten by the EMA
    q(_batch(*BATCHES[0]))
    q.start_running(0.95)
    for lo, hi in BATCHES:  # the reference feeds every batch, the initial one included
        q(_batch(lo, hi))
    q.finish_observing()
    lo, hi = -1.145, 2.0525
    if mode == "affine":
        scale, zp = (hi - lo) / 255, round(-lo / ((hi - lo) / 255))
        assert zp == 91
    else:
        scale, zp = hi / 127, 0
    assert q.scale.item() == pytest.approx(scale, rel=1e-6)
    assert q.zero_point.item() == zp


def test_running_stat_per_channel_and_per_group():
    q = ActQuantizer(8, "affine", channels=3, per_channel=True)
    q.start_observing("minmax")
    x0 = torch.zeros(2, 3, 4, 4)
    x0[:, 1] = 1.0
    q(x0)
    q.start_running(0.5)
    x1 = torch.zeros(2, 3, 4, 4)
    x1[:, 1] = 3.0
    x1[:, 2] = -2.0
    q(x1)
    lo, hi = q._observer.ranges()  # channel 1: 0.5·1 + 0.5·3 = 2; channel 2: 0.5·0 + 0.5·(-2)
    assert lo.flatten().tolist() == [0.0, 2.0, -1.0]
    assert hi.flatten().tolist() == [0.0, 2.0, -1.0]


def test_quantized_observation_quantizes_with_the_range_so_far():
    """Q-Diffusion's init (qdiff/quant_layer.py:68-89): the first input sets the range and is
    quantized at once; passing through is ours."""
    x = torch.linspace(-1, 1, 101).reshape(1, 101)
    passing, quantizing = ActQuantizer(2, "affine"), ActQuantizer(2, "affine")
    passing.start_observing("minmax")
    quantizing.start_observing("minmax", quantize=True)
    assert torch.equal(passing(x), x)
    scale, zp = range_to_qparams(torch.tensor(-1.0), torch.tensor(1.0), 2, "affine")
    expected = (torch.clamp(torch.round(x / scale) + zp, 0, 3) - zp) * scale
    assert torch.allclose(quantizing(x), expected)


def test_running_stat_over_the_denoiser_follows_the_given_rows(stream):
    """calibrate_act_ranges with RunningStat: the rows in the given order, a smaller last batch
    dropped (the reference's int(N / 64) loop)."""
    model = TinyDiffusion()
    quantize_denoiser(model.denoiser, model.spec, W4A8)
    seen: list[torch.Tensor] = []
    hook = model.denoiser.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["sample"].clone()), with_kwargs=True
    )
    order = stream.reference_order()
    try:
        calibrate_act_ranges(
            model.denoiser,
            stream,
            method="minmax",
            batch_size=4,
            rows=order[:4],
            quantized=True,
            running=RunningStat(order, batch_size=5, momentum=0.95),
        )
    finally:
        hook.remove()
    every = next(stream.ordered_batches(1000, order))["sample"]
    assert [len(s) for s in seen] == [4] + [5] * (len(stream) // 5)
    assert torch.equal(seen[0], every[:4]) and torch.equal(
        torch.cat(seen[1:]), every[: 5 * (len(stream) // 5)]
    )


# ============================================================================ 5. loss axis
def test_loss_axis_dim1_is_the_reference_sum_over_dim1():
    """qdiff/quant_layer.py:31 and BRECQ quant/quant_layer.py:28: ``.sum(1).mean()``. On token
    outputs (B, L, C) that is the token axis; on 4-D outputs both forms are the channel axis."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, 5, generator=g), torch.randn(3, 7, 5, generator=g)
    err = (a - b).abs().pow(2.4)
    assert torch.allclose(lp_loss(a, b, 2.4, "dim1"), err.sum(1).mean())
    assert torch.allclose(lp_loss(a, b, 2.4, "channels"), err.sum(2).mean())
    assert torch.allclose(
        lp_loss(a, b, 2.4, "dim1") / lp_loss(a, b, 2.4, "channels"), torch.tensor(7 / 5)
    )  # a constant factor L / C
    a4, b4 = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    assert torch.equal(lp_loss(a4, b4, 2.0, "dim1"), lp_loss(a4, b4, 2.0, "channels"))
    with pytest.raises(InvalidSetting, match="loss_axis"):
        ReconSettings(loss_axis="tokens")


# ============================================================================ 4. initialisation order
RECON = ReconSettings(weight_iters=6, act_iters=4, batch_size=8, capture_batch_size=16)


def _quantized(stream, quant=W4A8):
    model = TinyDiffusion()
    quantize_denoiser(model.denoiser, model.spec, quant)
    calibrate_act_ranges(model.denoiser, stream, method="lp", n_rows=12, batch_size=6)
    return model


def test_two_pass_order_equals_unit_by_unit(stream):
    """Every unit's AdaRound stage, then every unit's LSQ stage (Q-Diffusion's order) gives the
    unit-by-unit result: neither stage depends on another unit's activation quantizers."""
    a = _quantized(stream)
    reconstruct(a.denoiser, a.spec, stream, RECON)
    b = _quantized(stream)
    reconstruct(b.denoiser, b.spec, stream, dataclasses.replace(RECON, act_iters=0))
    reconstruct(b.denoiser, b.spec, stream, dataclasses.replace(RECON, weight_iters=0))
    sa, sb = quantizer_state_dict(a.denoiser), quantizer_state_dict(b.denoiser)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_after_weights_init_runs_on_the_hardened_network_from_the_first_rows(stream, tmp_path, monkeypatch):
    import diffquant.methods.ptq as ptq_module

    calls = []
    real = ptq_module.calibrate_act_ranges

    def spy(denoiser, s, **kw):
        rounding = {q.rounding for _, q in iter_quantizers(denoiser, "weight")}
        calls.append({"rounding": rounding, **kw})
        return real(denoiser, s, **kw)

    monkeypatch.setattr(ptq_module, "calibrate_act_ranges", spy)
    model = TinyDiffusion()
    cfg = PTQConfig(
        calib=CALIB, recon=RECON, act_init_stage="after_weights", act_init_select="first", act_init_rows=5
    )
    quant = dataclasses.replace(W4A8, act_running_stat=True)
    ctx = RunContext(
        run_dir=tmp_path / "run", cache_dir=stream.path.parent.parent, device=torch.device("cpu")
    )
    result = run_method(METHODS.get("ptq")(), model, quant, cfg, ctx)
    (call,) = calls
    assert call["rounding"] == {"hard"}  # after every unit's AdaRound stage
    assert call["quantized"] and call["batch_size"] == 5  # one forward of the 5 rows
    assert torch.equal(call["rows"], stream.reference_order()[:5])
    assert torch.equal(call["running"].rows, stream.reference_order())
    assert call["running"].momentum == 0.95 and call["running"].batch_size == 64
    units = result.tables["recon_units"].rows  # one row per unit, both passes merged
    assert len(units) == result.metrics["recon_units"] == len({u[0] for u in units})
    assert all(u[2] is not None and u[3] is not None for u in units)


# ============================================================================ 3. quant overrides
def test_quant_overrides_apply_to_the_ptq_row_only(stream, tmp_path):
    overrides = {"act_per_channel": False, "first_last_act_bits": None, "minmax_act_roles": []}
    cfg = PTQConfig(
        calib=CALIB,
        recon=dataclasses.replace(RECON, weight_iters=0, act_iters=0),
        act_init_rows=12,
        quant_overrides=overrides,
    )
    w4a4 = QuantConfig(name="w4a4", weight_bits=4, act_bits=4)
    ctx = RunContext(
        run_dir=tmp_path / "run", cache_dir=stream.path.parent.parent, device=torch.device("cpu")
    )
    row = TinyDiffusion()
    result = run_method(METHODS.get("ptq")(), row, w4a4, cfg, ctx)
    assert result.quant == dataclasses.replace(w4a4, **overrides)
    acts = dict(iter_quantizers(row.denoiser, "act"))
    assert not any(q.per_channel for q in acts.values())  # per tensor at 4 bits
    assert acts["conv_in.input_quantizer"].bits == 4  # no 8-bit first layer

    base = TinyDiffusion()  # QuEST / AccuQuant asking for their base: their own quant
    result = load_or_run_ptq(base, w4a4, cfg, ctx)
    assert result.quant == w4a4
    acts = dict(iter_quantizers(base.denoiser, "act"))
    assert acts["conv_in.input_quantizer"].bits == 8
    assert acts["down_blocks.0.resnets.0.conv1.input_quantizer"].per_channel


@pytest.mark.parametrize(
    "overrides,match", [({"act_bits": 8}, "bit-widths"), ({"act_per_chanel": False}, "not a QuantConfig")]
)
def test_quant_overrides_are_validated(overrides, match, make_cfg):
    with pytest.raises(InvalidSetting, match=match):
        PTQConfig(quant_overrides=overrides)
    key = next(iter(overrides))
    cfg = make_cfg(["quant=w4a8", "method=ptq_paper", f"+method.quant_overrides.{key}=1"])
    with pytest.raises(ConfigError, match="method.quant_overrides"):
        typed_run_config(cfg)


def test_quant_running_stat_settings_are_validated():
    with pytest.raises(InvalidSetting, match="act_momentum"):
        QuantConfig(act_momentum=1.0)
    with pytest.raises(InvalidSetting, match="act_init_stage"):
        PTQConfig(act_init_stage="later")
    with pytest.raises(InvalidSetting, match="act_running_order"):
        PTQConfig(act_running_order="random")


# ============================================================================ 6. attention inputs
def test_self_attention_projections_start_from_one_input_range(stream):
    """Q-Diffusion's LDM AttentionBlock has one input quantizer on qkv; ours one per projection
    of the same tensor: at min-max initialisation they hold the same range (FIDELITY.md)."""
    model = TinyDiffusion()
    quantize_denoiser(model.denoiser, model.spec, W4A8)
    calibrate_act_ranges(model.denoiser, stream, method="minmax", n_rows=12)
    acts = dict(iter_quantizers(model.denoiser, "act"))
    qkv = model.spec.layers(model.denoiser, "self_attention_qkv")
    assert qkv
    for q_name in [n for n in qkv if n.endswith("to_q")]:
        base = q_name[: -len("to_q")]
        scales = [acts[f"{base}{p}.input_quantizer"].scale for p in ("to_q", "to_k", "to_v")]
        assert torch.equal(scales[0], scales[1]) and torch.equal(scales[0], scales[2])


# ============================================================================ 7/8. the ledger
ROW_KEY = re.compile(r"`([A-Za-z_][\w.]*)=([^`]*)`")
HEADING = re.compile(r"^### `?(\w+)`?(?: · `?(\w+)`?)?\s*$")


@dataclasses.dataclass
class Section:
    experiment: str
    method: str | None
    rows: list[list[str]]
    text: str


def ledger_sections() -> dict[tuple[str, str | None], Section]:
    sections: dict[tuple[str, str | None], Section] = {}
    current = None
    for line in LEDGER.read_text().splitlines():
        m = HEADING.match(line)
        if m:
            current = Section(m.group(1), m.group(2), [], "")
            assert (current.experiment, current.method) not in sections, line
            sections[(current.experiment, current.method)] = current
            continue
        if line.startswith("## ") or line.startswith("### "):
            current = None  # a chapter, or a subsection of prose
        if current is None:
            continue
        current.text += line + "\n"
        if line.startswith("|") and not re.match(r"^\|\s*-", line):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if cells[0].lower() != "setting":
                assert len(cells) == 5, f"{current.experiment}: a row needs 5 columns: {line}"
                current.rows.append(cells)
    return sections


def experiments() -> list[str]:
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def grid_methods(experiment: str) -> list[str]:
    return yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())["grid"]["methods"]


def paper_pairs() -> list[tuple[str, str]]:
    return [(e, m) for e in experiments() if e != "embedded_digits" for m in grid_methods(e)]


def test_every_experiment_and_grid_method_has_a_ledger_section():
    sections = ledger_sections()
    missing = [p for p in paper_pairs() if p not in sections]
    assert not missing, f"experiments/FIDELITY.md lacks sections for {missing}"
    assert ("embedded_digits", None) in sections  # said explicitly: no reference to follow
    for (experiment, method), section in sections.items():
        assert experiment in experiments(), f"FIDELITY.md names an unknown experiment {experiment}"
        if method is not None:
            assert method in grid_methods(experiment), f"{experiment} has no grid method {method}"
            assert section.rows, f"{experiment} · {method}: no table"


def sampler_calls(model_cfg: Any) -> int:
    """Denoiser calls of the sampler: diffusers PNDM with ``skip_prk_steps`` (SD v1.4's scheduler
    config) calls it once more than its steps (the PLMS warm-up step); DDIM once per step."""
    if model_cfg.scheduler == "PNDMScheduler":
        from diffusers import PNDMScheduler

        sched = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
        sched.set_timesteps(model_cfg.num_inference_steps)
        return len(sched.timesteps)
    return model_cfg.num_inference_steps


def row_quant(run: Any) -> QuantConfig:
    """The quant config the row quantizes with: a PTQ row's ``quant_overrides`` applied; QuEST and
    AccuQuant (no ``quant_overrides``) quantize with the experiment's, their PTQ base too."""
    return method_quant(run.quant, run.method) if hasattr(run.method, "quant_overrides") else run.quant


def row_calib(run: Any) -> CalibSettings:
    """The row's calibration set: a PTQ row's own, QuEST's / AccuQuant's that of their PTQ base."""
    return run.method.calib if hasattr(run.method, "calib") else run.method.ptq.calib


def resolve(run: Any, key: str) -> Any:
    head, _, rest = key.partition(".")
    if head == "derived":
        calib = row_calib(run)
        steps = calib.recorded_steps(sampler_calls(run.model))
        guided = run.model.guidance_scale != 1.0
        per_trajectory = len(steps) if calib.step_sampling == "stride" else 1  # NDTC: one step each
        values = {
            "calib_steps": len(steps),
            "calib_rows": calib.n_samples * per_trajectory * (2 if guided else 1),
        }
        return values[rest]
    node: Any = row_quant(run) if head == "quant" else getattr(run, head)
    for part in rest.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


LEDGER_TABLES = [k for k, s in ledger_sections().items() if s.rows and k[1] is not None]


@pytest.mark.parametrize("experiment,method", LEDGER_TABLES, ids=[f"{e}-{m}" for e, m in LEDGER_TABLES])
def test_ledger_values_are_the_composed_config(experiment, method, make_cfg):
    section = ledger_sections()[(experiment, method)]
    run = typed_run_config(make_cfg([f"experiment={experiment}", f"method={method}"]))
    checked = 0
    for row in section.rows:
        for key, text in ROW_KEY.findall(row[3]):
            want = yaml.safe_load(text)
            got = resolve(run, key)
            assert got == want, (
                f"FIDELITY.md {experiment} · {method}, '{row[0]}': {key}={text}, but the config has {got!r}"
            )
            checked += 1
    assert checked >= 20, f"{experiment} · {method}: only {checked} values checked"


# ============================================================================ 10. end to end
def _tiny_model(model: str, root: Path) -> list[str]:
    """Overrides pointing ``model`` at tiny random components of its real classes (the same
    folders as tests/test_real_models.py)."""
    from test_real_models import tiny_folder

    folder, extra = tiny_folder(model, root)
    return [f"model.pretrained={folder}", *extra]


def baseline_row(experiment: str) -> str:
    """The experiment's Q-Diffusion row (``ptq`` for the embedded table)."""
    return next(m for m in grid_methods(experiment) if m in ("ptq_paper", "ptq_paper_sd", "ptq"))


#: run in `make test`; the others (the paper's 200 / 500-step samplers: 20-75 s each on 2 cores)
#: are `slow` (`make test-slow`)
FAST_E2E = ("quest_imagenet", "quest_sd", "embedded_digits")
E2E = [pytest.param(e, marks=() if e in FAST_E2E else pytest.mark.slow) for e in experiments()]


TINY = [
    "logger=none",
    "evaluator=digits",
    "evaluator.reference=digits_heldout",
    "evaluator.n_samples=4",
    "evaluator.batch_size=4",
    "evaluator.grid_size=0",
    "method.calib.n_samples=2",
    "method.calib.batch_size=2",
    "method.recon.weight_iters=2",
    "method.recon.act_iters=2",
    "method.recon.batch_size=4",
    "method.recon.capture_batch_size=64",
]


@pytest.mark.parametrize("experiment", E2E)
def test_every_experiment_baseline_row_runs_at_tiny_scale(experiment, make_cfg, tmp_path):
    """``run.py experiment=<name> method=<its PTQ row>`` on tiny random components of the real
    classes, the paper's sampler steps kept (Church: 500, 20 recorded), iterations cut."""
    from diffquant.app import run

    method = baseline_row(experiment)
    model_name = make_cfg([f"experiment={experiment}"], name="probe").model.name
    extra = [] if model_name.endswith("digits") else _tiny_model(model_name, tmp_path)
    rows = ["method.act_init_rows=4", "method.act_running_batch_size=4"]
    if model_name == "ldm_digits":
        extra += ["model.num_inference_steps=4"]
    cfg = make_cfg([f"experiment={experiment}", f"method={method}", *TINY, *rows, *extra])
    metrics = run(cfg)
    typed = typed_run_config(cfg)
    steps = typed.method.calib.recorded_steps(sampler_calls(typed.model))
    guided = typed.model.guidance_scale != 1.0
    assert metrics["calib_rows"] == 2 * len(steps) * (2 if guided else 1)
    assert metrics["method"] == "ptq" and metrics["n_samples"] == 4
    assert metrics["fid_to_fp"] is not None and metrics["recon_units"] > 0
