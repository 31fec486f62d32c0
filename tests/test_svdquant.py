"""SVDQuant (``method=svdquant``) and ViDiT-Q (``method=vidit_q``): the low-rank branch holds the
top singular directions of the smoothed weight, the layer computes Q(X̂)Q(R) + X̂L1L2, the search
picks the candidate with the smallest output error, per-token (and per-group) grids differ per
token, results are cached and restored bit for bit on every family."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffquant.calib import CalibSettings
from diffquant.context import RunContext
from diffquant.methods.result_cache import run_method
from diffquant.methods.svdquant import SVDQuantConfig, layer_rank, smoothing_factors, transformable
from diffquant.methods.vidit_q import ViDiTQConfig
from diffquant.models.denoiser import DIT, PIXART, UNET
from diffquant.quant import QuantConfig, quant_state, quantize_denoiser
from diffquant.quant.lowrank import SmoothLowRank, top_singular
from diffquant.quant.modules import QuantConv2d, QuantLinear
from diffquant.quant.quantizers import GroupWeightQuantizer, TokenActQuantizer, WeightQuantizer
from diffquant.quant.size import denoiser_bits
from diffquant.registry import METHODS
from diffquant.validation import InvalidSetting
from test_dit import call_batch
from tiny_components import randomize, tiny_dit, tiny_pixart
from tiny_models import TinyDiffusion, tiny_unet2d_condition, unet2d_condition_inputs, unet2d_inputs

torch.set_num_threads(1)

CALIB = CalibSettings(n_samples=6, step_stride=2, batch_size=4)
W4A4 = QuantConfig(name="w4a4", weight_bits=4, act_bits=4)


def _cfg(**kw):
    base = dict(calib=CALIB, act_init_rows=16, search_rows=16, search_batch_size=8, num_grids=4)
    return SVDQuantConfig(**{**base, **kw})


def _ctx(tmp_path):
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    return RunContext(run_dir=tmp_path / "run", cache_dir=tmp_path / "cache", device=torch.device("cpu"))


def _rel(a, b):
    return float((a - b).pow(2).sum() / b.pow(2).sum())


# ---------------------------------------------------------------------------- the transform
@pytest.mark.parametrize("shape", [(24, 40), (16, 8, 3, 3)])
def test_branch_is_the_top_singular_directions_of_the_smoothed_weight(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g)
    lam = torch.rand(shape[1], generator=g) * 4 + 0.1
    t = SmoothLowRank.from_weight(w, lam, rank=5)
    smoothed = w * lam.view(1, -1, *([1] * (w.dim() - 2)))
    s = torch.linalg.svdvals(smoothed.reshape(shape[0], -1).double())
    # Eckart-Young: the residual's spectrum is the smoothed weight's without its top 5 values
    s_res = torch.linalg.svdvals(t.residual(w).reshape(shape[0], -1).double())
    assert torch.allclose(s_res[:5], s[5:10], rtol=2e-3)
    # and the branch spans the top-5 right singular subspace
    _, _, vh = torch.linalg.svd(smoothed.reshape(shape[0], -1).double())
    proj = t.down.reshape(5, -1).double() @ vh[:5].T
    assert torch.allclose(proj.abs().pow(2).sum(1), torch.ones(5, dtype=torch.float64), atol=2e-3)
    # stored in 16 bits
    assert torch.equal(t.up, t.up.half().float()) and torch.equal(t.down, t.down.half().float())


def test_smoothing_factors_follow_the_formula():
    x_max = torch.tensor([1.0, 8.0, 0.5])
    w = torch.tensor([[1.0, -2.0, 0.25], [0.5, 1.0, -4.0]])
    lam = smoothing_factors(x_max, w, 0.3, 0.7)
    expected = x_max.pow(0.3) / torch.tensor([1.0, 2.0, 4.0]).pow(0.7)
    assert torch.allclose(lam, expected)
    assert torch.allclose(smoothing_factors(x_max, w, 0.0, 0.0), torch.ones(3))


def test_rank_cap_and_rank_zero():
    w = torch.zeros(96, 96, 3, 3)
    assert layer_rank(w, 32, 0.125) == 12
    assert layer_rank(w, 32, 1.0) == 32
    assert layer_rank(torch.zeros(8, 4), 32, 1.0) == 3  # never the full rank
    assert layer_rank(w, 0, 0.125) == 0


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_computes_quantized_residual_plus_fp_branch(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        layer, x = torch.nn.Linear(32, 16), torch.randn(3, 5, 32, generator=g)
    else:
        layer, x = torch.nn.Conv2d(32, 16, 3, padding=1, stride=2), torch.randn(2, 32, 6, 6, generator=g)
    with torch.no_grad():  # a dominant rank-2 part, as the outlier directions SVDQuant targets
        u, v = torch.randn(16, 2, generator=g), torch.randn(2, layer.weight[0].numel(), generator=g)
        layer.weight.add_((3 * u @ v).view_as(layer.weight) * layer.weight.abs().mean())
    ref = layer(x)
    wq = WeightQuantizer(tuple(layer.weight.shape), 4)
    aq = TokenActQuantizer(4)
    cls = QuantLinear if kind == "linear" else QuantConv2d
    q = cls.from_float(layer, wq, aq)
    lam = torch.rand(32, generator=g) + 0.5
    q.transform = SmoothLowRank.from_weight(layer.weight, lam, rank=4)
    wq.init_range(q.transform.residual(layer.weight), "minmax")
    axis = 1 if kind == "conv" else -1
    shape = [1] * x.dim()
    shape[axis] = -1
    x_hat = x / lam.view(shape)
    w_q = wq(q.transform.residual(layer.weight))
    branch_w = q.transform.lowrank_weight()
    if kind == "linear":
        expected = F.linear(aq(x_hat), w_q, layer.bias) + F.linear(x_hat, branch_w)
    else:
        expected = F.conv2d(aq(x_hat), w_q, layer.bias, 2, 1) + F.conv2d(x_hat, branch_w, None, 2, 1)
    with torch.no_grad():
        assert torch.allclose(q(x), expected, atol=1e-5)
        # without the branch (the whole smoothed weight on the 4-bit grid) the error is larger
        no_branch = WeightQuantizer(tuple(layer.weight.shape), 4)
        smoothed = q.transform.smooth_weight(layer.weight)
        no_branch.init_range(smoothed, "minmax")
        plain = (
            F.linear(x_hat, no_branch(smoothed), layer.bias)
            if kind == "linear"
            else F.conv2d(x_hat, no_branch(smoothed), layer.bias, 2, 1)
        )
        with quant_state(q, acts=False):
            assert _rel(q(x), ref) < 0.5 * _rel(plain, ref)
        # weights off: the FP product of the smoothed pair
        with quant_state(q, weights=False, acts=False):
            assert torch.allclose(q(x), ref, atol=1e-4)


# ---------------------------------------------------------------------------- quantizers
def test_per_token_scales_differ_per_token_and_per_group():
    x = torch.zeros(1, 2, 8)
    x[0, 0] = torch.linspace(0, 1, 8)  # token 0: range 1
    x[0, 1] = torch.linspace(0, 100, 8)  # token 1: range 100
    q = TokenActQuantizer(4)(x)
    # token 0 keeps a step of 1/15 (a per-tensor grid would have 100/15 and zero it out)
    assert (q[0, 0] - x[0, 0]).abs().max() <= 0.5 / 15 + 1e-6
    assert (q[0, 1] - x[0, 1]).abs().max() > 0.5 / 15
    # per group of 4 channels: the small half of a token keeps its own grid
    y = torch.cat([torch.linspace(0, 1, 4), torch.linspace(0, 100, 4)]).view(1, 1, 8)
    per_token = TokenActQuantizer(4)(y)
    grouped = TokenActQuantizer(4, group_size=4)(y)
    assert (grouped[..., :4] - y[..., :4]).abs().max() <= 0.5 / 15 + 1e-6
    assert (per_token[..., :4] - y[..., :4]).abs().max() > 0.1


def test_group_weight_quantizer_has_a_grid_per_input_group_and_refuses_adaround():
    w = torch.randn(4, 8, 3, 3)
    w[:, 4:] *= 100
    gq = GroupWeightQuantizer(tuple(w.shape), 4, "affine", group_size=4)
    gq.init_range(w, "minmax")
    assert gq.scale.shape == (4, 2)
    pc = WeightQuantizer(tuple(w.shape), 4)
    pc.init_range(w, "minmax")
    small = lambda q: (q(w)[:, :4] - w[:, :4]).abs().max()
    assert small(gq) < 0.1 * small(pc)
    with pytest.raises(RuntimeError, match="weight_group_size"):
        gq.start_adaround(w)


def test_settings_are_checked_before_any_work():
    with pytest.raises(InvalidSetting, match="rank_cap"):
        SVDQuantConfig(rank_cap=0.0)
    with pytest.raises(InvalidSetting, match="skip_roles"):
        SVDQuantConfig(skip_roles=["embeddings"])
    with pytest.raises(InvalidSetting, match="act_group_size"):
        QuantConfig(weight_bits=4, act_bits=4, act_group_size=64)
    with pytest.raises(InvalidSetting, match="alpha"):
        ViDiTQConfig(alpha=1.5)


# ---------------------------------------------------------------------------- the method
def test_search_keeps_the_candidate_with_the_smallest_output_error(tmp_path):
    model = TinyDiffusion()
    result = run_method(METHODS.get("svdquant")(), model, W4A4, _cfg(), _ctx(tmp_path))
    rows = result.tables["svdquant_layers"].rows
    assert rows and all(r[4] <= r[5] + 1e-12 for r in rows)  # chosen <= unsmoothed (a candidate)
    layers = dict(model.denoiser.named_modules())
    for name, rank, alpha, _beta, *_ in rows:
        t = layers[name].transform
        assert t.rank == rank and t.alpha == alpha
        # installed branch = top singular directions of the installed smoothed weight
        w_hat = t.smooth_weight(layers[name].weight.detach())
        up, down = top_singular(w_hat, rank)
        assert torch.allclose(
            t.lowrank_weight(), (up @ down.reshape(rank, -1)).view_as(w_hat), atol=2e-3 * w_hat.abs().max()
        )
    assert result.metrics["svdquant_rel_err_mean"] <= result.metrics["svdquant_rel_err_unsmoothed_mean"]


def test_branch_lowers_the_error_of_the_quantized_model(tmp_path):
    x = unet2d_inputs(4)
    fp = TinyDiffusion()
    with torch.no_grad():
        ref = fp.denoiser(**x).sample
    errs = {}
    for rank in (0, 8):
        model = TinyDiffusion()
        run_method(METHODS.get("svdquant")(), model, W4A4, _cfg(rank=rank, rank_cap=1.0), _ctx(tmp_path))
        with torch.no_grad():
            errs[rank] = _rel(model.denoiser(**x).sample, ref)
    assert errs[8] < 0.8 * errs[0]


def _families():
    return {
        "unet_text": (tiny_unet2d_condition, UNET, unet2d_condition_inputs(4)),
        "dit": (lambda: randomize(tiny_dit(), 0), DIT, call_batch("dit")),
        "pixart": (lambda: randomize(tiny_pixart(), 0), PIXART, call_batch("pixart")),
    }


@pytest.mark.parametrize("family", ["unet_text", "dit", "pixart"])
def test_transforms_are_saved_and_restored_on_every_family(family, tmp_path):
    from diffquant.quant.checkpoint import load_quantized, save_quantized

    make, spec, batch = _families()[family]
    denoiser = make()
    quant = QuantConfig(
        name="w4a4",
        weight_bits=4,
        act_bits=4,
        act_dynamic_per_token=True,
        weight_group_size=8,
        softmax_bits=32,
    )
    quantize_denoiser(denoiser, spec, quant)
    g = torch.Generator().manual_seed(0)
    n = 0
    for _, m in denoiser.named_modules():
        if isinstance(m, (QuantLinear, QuantConv2d)) and m.weight_quantizer is not None and transformable(m):
            lam = torch.rand(m.weight.shape[1], generator=g) + 0.5
            m.transform = SmoothLowRank.from_weight(m.weight, lam, rank=2)
            m.weight_quantizer.init_range(m.transform.residual(m.weight), "minmax")
            n += 1
    assert n > 0
    with torch.no_grad():
        out = spec.forward(denoiser, batch)
    save_quantized(denoiser, tmp_path / "q.pt", quant)
    fresh = make()
    load_quantized(fresh, spec, tmp_path / "q.pt")
    with torch.no_grad():
        again = spec.forward(fresh, batch)
    assert torch.equal(out, again)


def test_cached_result_is_bit_identical_and_sized_with_its_branch(tmp_path):
    x = unet2d_inputs(4)
    ctx = _ctx(tmp_path)
    first = TinyDiffusion()
    r1 = run_method(METHODS.get("svdquant")(), first, W4A4, _cfg(), ctx)
    second = TinyDiffusion()
    r2 = run_method(METHODS.get("svdquant")(), second, W4A4, _cfg(), ctx)
    assert r2.metrics["svdquant_cached"] and not r1.metrics["svdquant_cached"]
    with torch.no_grad():
        assert torch.equal(first.denoiser(**x).sample, second.denoiser(**x).sample)
    branch_bits = sum(
        16 * (m.transform.up.numel() + m.transform.down.numel()) + 32 * m.transform.smooth.numel()
        for m in second.denoiser.modules()
        if getattr(m, "transform", None) is not None
    )
    assert branch_bits > 0
    without = TinyDiffusion()
    quantize_denoiser(without.denoiser, without.spec, r2.quant)
    assert denoiser_bits(second.denoiser) - denoiser_bits(without.denoiser) == branch_bits


def test_vidit_q_balances_every_layer_with_its_fixed_alpha_and_no_branch(tmp_path):
    model = TinyDiffusion()
    cfg = ViDiTQConfig(calib=CALIB, act_init_rows=16, search_rows=16, search_batch_size=8)
    result = run_method(METHODS.get("vidit_q")(), model, W4A4, cfg, _ctx(tmp_path))
    assert result.quant.act_dynamic_per_token
    rows = result.tables["vidit_q_layers"].rows
    assert rows and {(r[1], r[2], r[3]) for r in rows} == {(0, 0.11, 0.89)}
    skipped = set(model.spec.layers(model.denoiser, "first", "last", "time_embedding", "time_projection"))
    assert skipped and not skipped & {r[0] for r in rows}
    tokens = [m for m in model.denoiser.modules() if isinstance(m, TokenActQuantizer)]
    assert tokens and all(m.group_size is None for m in tokens)
    assert math.isfinite(result.metrics["vidit_q_rel_err_mean"])


def test_refined_branch_is_never_worse_than_the_one_shot_svd(tmp_path):
    one = run_method(METHODS.get("svdquant")(), TinyDiffusion(), W4A4, _cfg(rank_cap=1.0), _ctx(tmp_path))
    model = TinyDiffusion()
    refined = run_method(
        METHODS.get("svdquant")(), model, W4A4, _cfg(rank_cap=1.0, lowrank_iters=4), _ctx(tmp_path)
    )
    a = {r[0]: r[4] for r in one.tables["svdquant_layers"].rows}
    b = {r[0]: (r[4], r[6]) for r in refined.tables["svdquant_layers"].rows}
    assert all(b[n][0] <= a[n] + 1e-12 for n in a)
    assert any(k > 0 for _, k in b.values())  # some layer kept a refined branch
    # the refined branch is SVD_r of (W·λ minus a quantized residual), not the one-shot SVD
    name = next(n for n, (_, k) in b.items() if k > 0)
    t = model.denoiser.get_submodule(name).transform
    w_hat = t.smooth_weight(model.denoiser.get_submodule(name).weight.detach())
    up, down = top_singular(w_hat, t.rank)
    assert not torch.allclose(t.lowrank_weight(), (up @ down.reshape(t.rank, -1)).view_as(w_hat), atol=1e-3)


def test_timestep_aware_balancing_routes_each_row_to_its_group():
    from diffquant.quant.lowrank import GroupSmooth

    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 5, 16, generator=g)
    smooth = torch.rand(2, 16, generator=g) + 0.5
    wqs = []
    for k in range(2):
        wq = WeightQuantizer(tuple(layer.weight.shape), 4)
        wq.init_range(layer.weight * smooth[k], "minmax")
        wqs.append(wq)
    q = QuantLinear.from_float(layer, WeightQuantizer(tuple(layer.weight.shape), 4), TokenActQuantizer(4))
    q.transform = GroupSmooth(smooth, wqs, 0.11)
    q.transform.group_index = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        out = q(x)
        for row, k in enumerate([0, 1, 1, 0]):
            xk = x[row : row + 1] / smooth[k]
            expected = F.linear(TokenActQuantizer(4)(xk), wqs[k](layer.weight * smooth[k]), layer.bias)
            assert torch.allclose(out[row : row + 1], expected, atol=1e-6)
        # the two groups' weights differ: the same input gives different outputs
        q.transform.group_index = torch.tensor([1])
        assert not torch.allclose(q(x[:1]), out[:1])


def test_vidit_q_timestep_has_a_vector_per_step_group_and_reloads_bit_identical(tmp_path):
    x = unet2d_inputs(4)
    cfg = ViDiTQConfig(
        calib=CALIB,
        act_init_rows=16,
        search_rows=16,
        search_batch_size=8,
        quant_overrides={"act_dynamic_per_token": True, "timestep_aware": True, "timestep_groups": 2},
    )
    ctx = _ctx(tmp_path)
    first = TinyDiffusion()
    r1 = run_method(METHODS.get("vidit_q")(), first, W4A4, cfg, ctx)
    assert r1.quant.timestep_aware and r1.quant.timestep_groups == 2
    smooths = [
        m.transform.smooth for m in first.denoiser.modules() if getattr(m, "transform", None) is not None
    ]
    assert smooths and all(s.shape[0] == 2 for s in smooths)
    assert any(not torch.allclose(s[0], s[1]) for s in smooths)  # the groups' statistics differ
    second = TinyDiffusion()
    r2 = run_method(METHODS.get("vidit_q")(), second, W4A4, cfg, ctx)
    assert r2.metrics["vidit_q_cached"]
    with torch.no_grad():
        assert torch.equal(first.denoiser(**x).sample, second.denoiser(**x).sample)
    static = {**cfg.quant_overrides, "act_dynamic_per_token": False}
    with pytest.raises(InvalidSetting, match="act_dynamic_per_token"):
        METHODS.get("vidit_q").check(W4A4, ViDiTQConfig(quant_overrides=static))


def test_vidit_q_mixed_precision_puts_the_first_group_and_the_roles_at_8_bits(tmp_path):
    x = unet2d_inputs(4)
    overrides = {"act_dynamic_per_token": True, "timestep_aware": True, "timestep_groups": 4}
    base = dict(calib=CALIB, act_init_rows=16, search_rows=16, search_batch_size=8, quant_overrides=overrides)
    ctx = _ctx(tmp_path)
    plain = TinyDiffusion()
    run_method(METHODS.get("vidit_q")(), plain, W4A4, ViDiTQConfig(**base), ctx)
    cfg = ViDiTQConfig(**base, mp_first_groups=1, mp_roles=["attention_out"])
    first = TinyDiffusion()
    run_method(METHODS.get("vidit_q")(), first, W4A4, cfg, ctx)
    ff = set(first.spec.layers(first.denoiser, "attention_out"))
    assert ff
    for name, m in first.denoiser.named_modules():
        t = getattr(m, "transform", None)
        if t is None:
            continue
        want = [8, 8, 8, 8] if name in ff else [8, 4, 4, 4]
        assert t.bits.tolist() == want, name
        leaf_bits = [
            {m.bits for m in q.modules() if isinstance(m, WeightQuantizer)} for q in t.weight_quantizers
        ]
        assert leaf_bits == [{b} for b in want]
    assert denoiser_bits(first.denoiser) > denoiser_bits(plain.denoiser)
    second = TinyDiffusion()  # reloaded from the cache with each group's bit-width
    r2 = run_method(METHODS.get("vidit_q")(), second, W4A4, cfg, ctx)
    assert r2.metrics["vidit_q_cached"]
    with torch.no_grad():
        assert torch.equal(first.denoiser(**x).sample, second.denoiser(**x).sample)
    with pytest.raises(InvalidSetting, match="mp_first_groups"):
        METHODS.get("vidit_q").check(W4A4, ViDiTQConfig(mp_first_groups=1))
