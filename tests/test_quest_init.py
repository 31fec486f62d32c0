"""QuEST's per-time-step activation init (``diffquant.methods.quest_init``) and the routing of
time-step groups by sampler step index (``diffquant.quant.timestep``): the percentile search, the
rows and network each group's range comes from, running statistics, the SD script's shared init,
and a PNDM schedule (a repeated time step) whose every step reaches its own group."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler

from diffquant.calib import CalibSettings, calibrate_act_ranges, collect_calibration
from diffquant.methods.quest import QuestConfig, make_timestep_aware, step_init
from diffquant.methods.quest_init import (
    PERCENTILES,
    StepInit,
    init_timestep_ranges,
    percentile_search_range,
    percentile_search_range_blocks,
    take_rows,
)
from diffquant.models.denoiser import UNET
from diffquant.quant import QuantConfig, iter_quantizers, quant_state, quantize_denoiser
from diffquant.quant.quantizers import channels_first, fake_quant, int_range, range_to_qparams
from diffquant.quant.timestep import TimestepRouter, get_router, sampler_step
from diffquant.validation import InvalidSetting
from tiny_models import TinyDiffusion, tiny_unet2d

W4A8 = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)
CALIB = CalibSettings(n_samples=5, step_stride=2, batch_size=2)  # 3 of 6 steps, 10 rows each

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyPNDM(TinyDiffusion):
    """The tiny guided model with diffusers' PNDM (PLMS, no Runge-Kutta warm-up): 5 steps give the
    6 time steps [801, 601, 601, 401, 201, 1]."""

    def __init__(self, steps: int = 5) -> None:
        super().__init__(steps=steps)
        self.scheduler = PNDMScheduler(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        self.scheduler.set_timesteps(steps)
        self._step_kwargs = {"model_output", "timestep", "sample"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    model = TinyDiffusion(steps=6)
    return model, collect_calibration(model, CALIB, tmp_path_factory.mktemp("cache"))


def quantized(model, stream, groups=3, quant=W4A8):
    """A quantized copy of the tiny UNet (weights round-to-nearest on L_p ranges, activation
    ranges min-max over all rows), split into ``groups`` time-step groups."""
    denoiser = tiny_unet2d(0)
    denoiser.load_state_dict(model.denoiser.state_dict())
    quantize_denoiser(denoiser, UNET, quant)
    calibrate_act_ranges(denoiser, stream, method="minmax", n_rows=None, batch_size=16)
    if groups > 1:
        make_timestep_aware(denoiser, UNET, model.timesteps, groups)
    return denoiser.requires_grad_(False)


def observed_inputs(denoiser, batch, quantized_net):
    """Every activation quantizer's input on ``batch`` (rows with ``_step``) with the network
    quantized (weights and activations) or FP."""
    seen, handles = {}, []
    for name, q in iter_quantizers(denoiser, "act"):
        handles.append(
            q.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].detach().clone()))
        )
        if not quantized_net:  # every quantizer runs, but passes its input on
            handles.append(q.register_forward_hook(lambda m, a, out: a[0]))
    kwargs = {k: v for k, v in batch.items() if k != "_step"}
    try:
        with (
            torch.no_grad(),
            quant_state(denoiser, weights=quantized_net, acts=True),
            sampler_step(denoiser, batch["_step"]),
        ):
            denoiser(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def group_qparams(q, x):
    x2d = channels_first(x, q.per_channel, q._ch_axis(x))
    return range_to_qparams(x2d.amin(1), x2d.amax(1), q.bits, q.mode)


# ---------------------------------------------------------------------------- percentile search
def test_percentile_search_keeps_the_candidate_with_the_least_squared_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4000, generator=g)
    x[0, 0] = 60.0  # a rare outlier
    x[2] = x[2].sign() * x[2].abs().pow(0.2)  # light tails
    chosen = set()
    for bits in (4, 8):
        lo, hi = percentile_search_range(x, bits, "affine")
        q_min, q_max = int_range(bits, "affine")
        for c in range(3):  # brute force, as the QuEST code: one torch.quantile per value
            cands = [(torch.quantile(x[c], 1.0 - p), torch.quantile(x[c], p)) for p in PERCENTILES]
            errs = []
            for c_lo, c_hi in cands:
                s, z = range_to_qparams(c_lo.reshape(1), c_hi.reshape(1), bits, "affine")
                xq = fake_quant(x[c : c + 1], s[:, None], z[:, None], q_min, q_max)
                errs.append(float((xq - x[c]).pow(2).mean()))
            best = int(np.argmin(errs))
            chosen.add(best)
            assert (lo[c], hi[c]) == cands[best]
        if bits == 4:
            assert hi[0] < x[0].max()  # the outlier is clipped
    assert len(chosen) > 1


def test_percentile_search_beyond_torch_quantile_falls_back_to_numpy(monkeypatch):
    x = torch.randn(2, 5000, generator=torch.Generator().manual_seed(1))
    expected = percentile_search_range(x, 4, "affine")

    def too_large(*args, **kwargs):
        raise RuntimeError("quantile() input tensor is too large")

    monkeypatch.setattr(torch, "quantile", too_large)
    lo, hi = percentile_search_range(x, 4, "affine")
    torch.testing.assert_close(lo, expected[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hi, expected[1], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- rows and network
def test_reference_order_is_step_major_with_conditional_rows_first(tiny):
    model, stream = tiny
    rows = take_rows(stream, stream.reference_order())
    steps, labels = rows["_step"].tolist(), rows["class_labels"].tolist()
    null = 4  # TinyDiffusion's null class
    assert steps == [0] * 5 + [2] * 5 + [4] * 5 + [0] * 5 + [2] * 5 + [4] * 5
    assert labels[:15] == [0, 1, 2, 3, 0] * 3 and labels[15:] == [null] * 15


@pytest.mark.parametrize("network", ["quantized", "fp"])
def test_each_group_gets_the_min_max_of_its_first_rows(tiny, network):
    """Every quantizer's group ``g`` holds the min-max range of its input on the first k rows of
    step ``g`` — inputs of the quantized network (upstream activations quantized with their
    just-set ranges), or of the FP one."""
    model, stream = tiny
    denoiser = quantized(model, stream)
    k = 3
    init = StepInit(
        method="minmax",
        network=network,
        rows=None,
        rows_per_step=k,
    )
    assert init_timestep_ranges(denoiser, stream, init) > 60
    order = stream.reference_order()
    rows = take_rows(stream, order)
    for g, step in enumerate(stream.index["steps"]):
        first = {key: v[rows["_step"] == step][:k] for key, v in rows.items()}
        assert first["class_labels"].tolist() == [0, 1, 2]  # conditional rows first
        inputs = observed_inputs(denoiser, first, network == "quantized")
        for name, q in iter_quantizers(denoiser, "act"):
            scale, zp = group_qparams(q, inputs[name])
            torch.testing.assert_close(q.scale[g], scale, rtol=1e-5, atol=1e-8, msg=name)
            assert torch.equal(q.zero_point[g], zp), name
    # the quantized network's ranges differ from the FP network's beyond the first layer
    fp = quantized(model, stream)
    init_timestep_ranges(fp, stream, dataclasses.replace(init, network="fp"))
    differ = [
        n
        for (n, a), (_, b) in zip(iter_quantizers(denoiser, "act"), iter_quantizers(fp, "act"))
        if not torch.equal(a.scale, b.scale)
    ]
    assert bool(differ) == (network == "quantized")


def test_running_statistics_average_each_steps_batches(tiny):
    """After the first k rows, every batch of the step's rows (conditional first, a last partial
    batch dropped) moves the range to the EMA of per-batch min / max, started from the min / max
    of the first rows; on the network input (``conv_in``'s) that is checkable by hand."""
    model, stream = tiny
    denoiser = quantized(model, stream)
    init = StepInit(
        method="percentile",
        network="quantized",
        rows=None,
        rows_per_step=4,
        running=True,
        running_batch_size=3,
        momentum=0.9,
    )
    init_timestep_ranges(denoiser, stream, init)
    q = denoiser.conv_in.input_quantizer
    rows = take_rows(stream, stream.reference_order())
    for g, step in enumerate(stream.index["steps"]):
        x = rows["sample"][rows["_step"] == step]  # 10 rows: 5 conditional, 5 unconditional
        x2d = lambda t: channels_first(t, q.per_channel, 1).double()  # noqa: E731
        lo, hi = x2d(x[:4]).amin(1), x2d(x[:4]).amax(1)
        for start in (0, 3, 6):  # batches of 3; the 10th row is dropped
            b = x2d(x[start : start + 3])
            lo, hi = 0.9 * lo + 0.1 * b.amin(1), 0.9 * hi + 0.1 * b.amax(1)
        scale, zp = range_to_qparams(lo.float(), hi.float(), q.bits, q.mode)
        torch.testing.assert_close(q.scale[g], scale, rtol=1e-5, atol=1e-8)
        assert torch.equal(q.zero_point[g], zp)


def test_shared_init_copies_one_set_and_running_stats_move_the_first_group(tiny):
    """The QuEST SD script: one set from random rows of all steps, copied into every group; its
    running statistics then run with the first step selected, so only group 0 moves."""
    model, stream = tiny
    init = StepInit(
        method="percentile", network="quantized", scope="shared", rows=4, running=False, batch_size=8
    )
    denoiser = quantized(model, stream)
    init_timestep_ranges(denoiser, stream, init)
    for _, q in iter_quantizers(denoiser, "act"):
        assert torch.equal(q.scale[1:], q.scale[:1].expand_as(q.scale[1:]))
    running = quantized(model, stream)
    init_timestep_ranges(running, stream, dataclasses.replace(init, running=True, running_batch_size=4))
    moved = 0
    for (name, a), (_, b) in zip(iter_quantizers(denoiser, "act"), iter_quantizers(running, "act")):
        assert torch.equal(a.scale[1:], b.scale[1:]), name  # groups 1.. keep the copy
        moved += not torch.equal(a.scale[0], b.scale[0])
    assert moved > 30
    assert all(q.group_index is None for _, q in iter_quantizers(running, "act"))


def test_default_init_is_the_quest_codes():
    init = step_init(QuestConfig(), W4A8)
    assert (init.method, init.network, init.scope, init.rows_per_step, init.running) == (
        "percentile",
        "quantized",
        "per_step",
        64,
        False,
    )


def test_lp_init_on_the_fp_network_is_the_range_observer(tiny):
    """The earlier default (L_p on the FP network, random rows) sets exactly what
    ``calibrate_act_ranges`` sets (on a DDIM schedule, where values and step indices agree)."""
    model, stream = tiny
    cfg = QuestConfig(
        timestep_init="lp",
        timestep_init_network="fp",
        timestep_init_rows_per_step=None,
        timestep_init_rows=16,
    )
    init = step_init(cfg, W4A8)
    assert init.observer and not init.running
    ours, old = quantized(model, stream), quantized(model, stream)
    init_timestep_ranges(ours, stream, init)
    calibrate_act_ranges(old, stream, method="lp", n_rows=16, batch_size=init.batch_size, seed=cfg.seed)
    for (name, a), (_, b) in zip(iter_quantizers(ours, "act"), iter_quantizers(old, "act")):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point), name


def test_running_stat_none_means_above_4_activation_bits():
    cfg = QuestConfig(timestep_init_running_stat=None)
    assert step_init(cfg, W4A8).running
    assert not step_init(cfg, dataclasses.replace(W4A8, act_bits=4)).running
    assert not step_init(dataclasses.replace(cfg, timestep_init="ptq"), W4A8).running


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"timestep_init_rows_per_step": 0}, "timestep_init_rows_per_step"),
        ({"timestep_init_scope": "global"}, "timestep_init_scope"),
        ({"timestep_init": "ptq", "timestep_init_running_stat": True}, "timestep_init_running_stat"),
        ({"timestep_init": "median"}, "timestep_init"),
        ({"timestep_init_network": "int8"}, "timestep_init_network"),
        ({"timestep_init_momentum": 1.0}, "timestep_init_momentum"),
        ({"loss_form": "eq7"}, "loss_form"),
        ({"cma_exclude_act_roles": ["time_mlp"]}, "cma_exclude_act_roles"),
    ],
)
def test_impossible_init_settings_fail_naming_the_key(settings, key):
    with pytest.raises(InvalidSetting, match=key):
        QuestConfig(**settings)


# ---------------------------------------------------------------------------- routing
def test_router_routes_by_step_index_where_the_schedule_agrees(caplog):
    schedule = [801, 601, 601, 401, 201, 1]
    router = TimestepRouter(schedule, 3)
    # by value, both 601s are step 1; by index, step 2 is step 2
    assert router.groups(torch.tensor([601, 601])).tolist() == [0, 0]
    assert router.groups(torch.tensor([801, 601, 601, 401, 201, 1]), torch.arange(6)).tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    assert router.groups(torch.tensor([601] * 4), 2).tolist() == [1] * 4  # one index, all rows
    # an index whose time step is not the call's (another schedule): by value, with a warning
    with caplog.at_level(logging.WARNING):
        assert router.groups(torch.tensor([401]), 1).tolist() == [1]
    assert "routing time-step groups by value" in caplog.text
    with pytest.raises(ValueError, match="outside 0..5"):
        router.step_groups(6)


@pytest.fixture(scope="module")
def pndm(tmp_path_factory, one_thread):
    model = TinyPNDM()
    assert [int(t) for t in model.timesteps] == [801, 601, 601, 401, 201, 1]
    stream = collect_calibration(
        model, CalibSettings(n_samples=3, step_stride=1, batch_size=3), tmp_path_factory.mktemp("pndm")
    )
    return model, stream


def test_pndm_every_step_reaches_its_own_group(pndm):
    """PNDM's repeated 601: routed by value, step 2's rows would land in group 1 and group 2 would
    get no calibration row; by step index every group gets its own step's ranges, and sampling
    routes step ``i`` to group ``i · G // S``."""
    model, stream = pndm
    groups = len(model.timesteps)
    denoiser = quantized(model, stream, groups=groups)
    init = StepInit(method="minmax", network="fp", rows=None, rows_per_step=6)
    init_timestep_ranges(denoiser, stream, init)
    q = denoiser.conv_in.input_quantizer
    data = take_rows(stream, torch.arange(len(stream)))
    for g in range(groups):
        x = data["sample"][data["_step"] == g]
        scale, zp = group_qparams(q, x)
        torch.testing.assert_close(q.scale[g], scale, msg=f"group {g}")
    assert not torch.equal(q.scale[1], q.scale[2])

    # sampling: the group each step uses
    model.denoiser = denoiser
    used = []
    handle = q.register_forward_pre_hook(lambda m, a: used.append(m.group_index.tolist()))
    try:
        with torch.no_grad():
            model.sample_latents([0], seed=0)
    finally:
        handle.remove()
    assert [u[0] for u in used] == [i * groups // len(model.timesteps) for i in range(len(model.timesteps))]
    # a caller outside diffquant (no step index): by value, as before
    get_router(denoiser).route(denoiser, torch.tensor([601]))
    assert q.group_index.tolist() == [1]


def test_pndm_groups_split_steps_evenly(pndm):
    model, stream = pndm
    router = TimestepRouter(model.timesteps, 3)
    steps = torch.arange(6)
    assert router.groups(model.timesteps, steps).tolist() == (steps * 3 // 6).tolist()


def test_quest_on_a_pndm_schedule_sets_every_group_from_its_own_step(tmp_path):
    """``method=quest`` (the first rows of each step, on the quantized network) on the PNDM model:
    six groups for six steps, the repeated 601 included, each from its own rows (CMA is off: it
    would retrain the step size checked here)."""
    from diffquant.calib import ReconSettings
    from diffquant.context import RunContext
    from diffquant.methods.ptq import PTQConfig
    from diffquant.methods.result_cache import run_method
    from diffquant.registry import METHODS

    model = TinyPNDM()
    ptq = PTQConfig(
        calib=CalibSettings(n_samples=3, step_stride=1, batch_size=3),
        act_init_rows=12,
        act_init_batch_size=12,
        recon=ReconSettings(weight_iters=1, act_iters=1, batch_size=4, capture_batch_size=12),
    )
    cfg = QuestConfig(
        ptq=ptq,
        tla_epochs=1,
        cma=False,
        samples_per_step=2,
        batch_size=4,
        eval_rows=2,
        timestep_init="minmax",
        timestep_init_rows_per_step=6,
        init_guard=False,  # the init itself is checked here, kept whatever its held-out error
        guard=False,
    )
    ctx = RunContext(run_dir=tmp_path, cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    stream = collect_calibration(model, ptq.calib, ctx.cache_dir)  # the FP model's, as QuEST's
    data = take_rows(stream, torch.arange(len(stream)))
    result = run_method(METHODS.get("quest")(), model, W4A8, cfg, ctx)
    assert result.metrics["timestep_groups"] == 6
    q = model.denoiser.conv_in.input_quantizer  # its input is the latents: checkable by hand
    for g in range(6):
        scale, _ = group_qparams(q, data["sample"][data["_step"] == g])
        torch.testing.assert_close(q.scale[g], scale, msg=f"group {g}")


def test_pndm_act_ranges_and_lsq_route_by_step_index(pndm):
    """The PTQ calibration of time-step-aware quantizers (``quant.timestep_aware``) on PNDM's
    repeated 601: ``calibrate_act_ranges`` sets group 2 from step 2's rows (by value it would get
    none and keep its copied range), and block reconstruction's LSQ stage trains group 2 (by value
    its step size would never move)."""
    from diffquant.calib import ReconSettings, reconstruct

    _, stream = pndm
    model = TinyPNDM()  # the fixture's model may hold a quantized denoiser by now
    groups = len(model.timesteps)
    denoiser = quantized(model, stream, groups=groups)
    q = denoiser.conv_in.input_quantizer
    data = take_rows(stream, torch.arange(len(stream)))
    calibrate_act_ranges(denoiser, stream, method="minmax", n_rows=None, batch_size=4)
    for g in range(groups):
        scale, _ = group_qparams(q, data["sample"][data["_step"] == g])
        torch.testing.assert_close(q.scale[g], scale, msg=f"group {g}")
    assert not torch.equal(q.scale[1], q.scale[2])

    before = q.scale.detach().clone()
    settings = ReconSettings(weight_iters=0, act_iters=6, batch_size=len(stream), act_lr=1e-2)
    reconstruct(denoiser.requires_grad_(True), UNET, stream, settings)  # a trainable model: frozen inside
    moved = (q.scale.detach() != before).reshape(groups, -1).any(dim=1)
    assert moved.all(), f"groups whose step size LSQ never trained: {(~moved).nonzero().flatten().tolist()}"


@pytest.mark.parametrize(
    "method, running, network",
    [
        ("minmax", True, "fp"),
        ("percentile", True, "fp"),
        ("percentile", False, "fp"),
        ("lp", False, "fp"),
        ("minmax", False, "quantized"),
    ],
)
def test_attention_probabilities_are_watched_in_query_blocks(tiny, monkeypatch, method, running, network):
    """The init watches the attention probabilities' calls block by block of queries, the whole
    call's update: min-max ranges and the running statistics from the blocks' min / max, the
    percentile search block by block (no call formed whole), the L_p search on the call's blocks
    concatenated. The ranges are those
    of all queries at once up to float rounding: every quantizer's on the FP network; on the
    quantized one the first attention's (a last-bit difference flips roundings downstream)."""
    import diffquant.methods.quest_init as quest_init
    import diffquant.quant.attention as attention

    model, stream = tiny
    init = StepInit(
        method=method, network=network, rows=None, rows_per_step=4, running=running, running_batch_size=3
    )
    widths, whole_calls, adds = [], [], []
    prob_qs: list = []  # the current model's probabilities' quantizers
    probs = attention.QuantAttnProcessor._probs
    update, add = quest_init._GroupRanges._update, quest_init._GroupRanges._add
    monkeypatch.setattr(
        attention.QuantAttnProcessor,
        "_probs",
        staticmethod(lambda attn, q, k, m: (widths.append(q.shape[2]), probs(attn, q, k, m))[1]),
    )
    monkeypatch.setattr(
        quest_init._GroupRanges,
        "_update",
        lambda self, q, g, x: (whole_calls.append(q in prob_qs and x.shape[2] > 1), update(self, q, g, x))[1],
    )
    monkeypatch.setattr(
        quest_init._GroupRanges, "_add", lambda self, q, *a: (adds.append(q in prob_qs), add(self, q, *a))[1]
    )
    ranges, prob_ranges, prob_updates = {}, {}, {}
    big = attention.ATTENTION_BLOCK_ELEMENTS  # all queries of the tiny model in one block
    for block in (big, 1):
        monkeypatch.setattr(attention, "ATTENTION_BLOCK_ELEMENTS", block)
        for seen in (widths, whole_calls, adds):
            seen.clear()
        denoiser = quantized(model, stream)
        prob_qs[:] = [m.prob_quantizer for m in denoiser.modules() if hasattr(m, "prob_quantizer")]
        init_timestep_ranges(denoiser, stream, init)
        ranges[block] = [q.scale.clone() for _, q in iter_quantizers(denoiser, "act")]
        prob_ranges[block] = [q.scale.clone() for q in prob_qs]
        prob_updates[block] = sum(adds)
        if block == 1:
            assert set(widths) == {1}  # one query at a time, in the watched pass and the output
            # the probabilities reach the init as a whole call only for the L_p search
            assert any(whole_calls) == (method == "lp")
        else:
            assert max(widths) > 1 and any(whole_calls)
    assert prob_updates[1] == prob_updates[big] > 0  # each call's groups updated once, not per block
    compared = (
        zip(ranges[big], ranges[1]) if network == "fp" else zip(prob_ranges[big][:1], prob_ranges[1][:1])
    )
    for whole, blocks in compared:
        torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("channels, widths", [(1, [7, 300, 1, 4000, 13]), (3, [2500, 2500, 11])])
def test_percentile_search_over_blocks_is_the_whole_datas(channels, widths):
    """The percentile search on data given block by block (the quantiles from each row's merged
    extremes, the errors summed block by block) chooses the whole data's range, bit for bit."""
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(channels, w, generator=g) ** 3 for w in widths]  # heavy tails
    whole = torch.cat(blocks, dim=1)
    for bits, mode in ((4, "affine"), (8, "symmetric")):
        lo, hi = percentile_search_range_blocks(lambda: iter(blocks), bits, mode)
        expected = percentile_search_range(whole, bits, mode)
        assert torch.equal(lo, expected[0]) and torch.equal(hi, expected[1])
    # the three candidates differ here, so the choice is tested, not only the quantiles
    qs = torch.quantile(whole, torch.tensor([0.999, 0.9999, 0.99999]), dim=1)
    assert (qs[1:] > qs[:-1] * (1 + 1e-3)).all()


def test_percentile_search_over_blocks_beyond_torch_quantile_is_numpys():
    """Above ``torch.quantile``'s size the whole data's search takes numpy's percentiles (float64
    ranks); the block-by-block search reads the same ranks."""
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(1, w, generator=g) ** 3 for w in (1 << 23, (1 << 23) + 777, 5)]
    lo, hi = percentile_search_range_blocks(lambda: iter(blocks), 8, "symmetric")
    expected = percentile_search_range(torch.cat(blocks, dim=1), 8, "symmetric")
    assert torch.equal(lo, expected[0]) and torch.equal(hi, expected[1])
