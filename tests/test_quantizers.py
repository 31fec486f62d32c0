"""Quantizer math: agreement with torch's fake-quant ops, STE/LSQ gradients, range search,
AdaRound, time-step groups."""

import pytest
import torch

from diffquant.quant import (
    ActQuantizer,
    AdaRound,
    RoundingSchedule,
    WeightQuantizer,
    fake_quant,
    find_range,
    int_range,
    lp_search_range,
    range_to_qparams,
)

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "bits,mode", [(8, "affine"), (4, "affine"), (8, "symmetric"), (4, "symmetric"), (8, "unsigned")]
)
def test_fake_quant_matches_torch_per_tensor(bits, mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 5, 5, generator=g) * 3
    q_min, q_max = int_range(bits, mode)
    scale, zp = range_to_qparams(torch.tensor(-2.5), torch.tensor(4.0), bits, mode)
    ours = fake_quant(x, scale, zp, q_min, q_max)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), q_min, q_max)
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("bits,mode", [(8, "affine"), (4, "affine"), (3, "symmetric")])
def test_weight_quantizer_matches_torch_per_channel(bits, mode):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 3, 3, 3, generator=g)
    q = WeightQuantizer(tuple(w.shape), bits, mode)
    q.init_range(w, "minmax")
    ref = torch.fake_quantize_per_channel_affine(
        w, q.scale, q.zero_point.to(torch.int32), 0, q.q_min, q.q_max
    )
    assert torch.allclose(q(w), ref, atol=1e-6)


@pytest.mark.parametrize("shape,axis", [((2, 6, 4, 4), 1), ((2, 7, 6), 2), ((5, 6), 1)])
def test_act_quantizer_per_channel_matches_torch(shape, axis):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g)
    c = shape[axis]
    q = ActQuantizer(8, "affine", channels=c, per_channel=True)
    lo, hi = -torch.rand(c, generator=g) - 0.5, torch.rand(c, generator=g) + 0.5
    q.set_range(lo, hi)
    ref = torch.fake_quantize_per_channel_affine(
        x, q.scale[0].detach(), q.zero_point[0].to(torch.int32), axis, q.q_min, q.q_max
    )
    assert torch.allclose(q(x), ref, atol=1e-6)


def test_ste_gradients_and_lsq_step():
    q = ActQuantizer(4, "affine")
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    q.scale.requires_grad_(True)
    x = torch.tensor([-3.0, -0.37, 0.0, 0.41, 3.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # identity inside the range, 0 outside
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()
    assert q.scale.grad.abs().sum() > 0


def test_lp_search_grid_and_outliers():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 20000, generator=g)
    x[0, 0] = 40.0  # one outlier: min-max wastes the grid on it
    lo, hi = lp_search_range(x, 4, "affine", p=2.4, n_candidates=80)
    ratio = float(hi / x.max())
    assert 0.21 - 1e-6 <= ratio < 0.99
    assert abs(ratio * 100 - round(ratio * 100)) < 1e-4  # on the 1 - 0.01 i grid
    assert torch.allclose(lo / x.min(), torch.tensor(ratio))

    def err(lo_, hi_):
        s, z = range_to_qparams(lo_, hi_, 4, "affine")
        return (fake_quant(x, s, z, 0, 15) - x).abs().pow(2.4).mean()

    assert err(lo, hi) < err(x.min(), x.max())
    # per channel: one search per row
    rows = torch.stack([torch.randn(500, generator=g), 10 * torch.randn(500, generator=g)])
    lo2, hi2 = find_range(rows, 8, "affine", "lp")
    assert lo2.shape == (2,) and hi2[1] > 3 * hi2[0]


def test_observer_minmax_and_groups():
    q = ActQuantizer(8, "affine", n_groups=2)
    q.start_observing("minmax")
    q.group_index = torch.tensor([0, 0, 1])
    q(torch.tensor([[1.0, -2.0], [0.5, 0.0], [7.0, -1.0]]))
    q.group_index = torch.tensor([1, 1, 1])
    q(torch.tensor([[3.0, -4.0], [0.0, 0.0], [0.0, 0.0]]))
    q.finish_observing()
    scale_expected = torch.tensor([3.0 / 255, 11.0 / 255])
    assert torch.allclose(q.scale.detach().flatten(), scale_expected)
    # rows pick their group's parameters
    x = torch.full((2, 2), 0.3)
    q.group_index = torch.tensor([0, 1])
    y = q(x)
    single = [ActQuantizer(8), ActQuantizer(8)]
    for k, s in enumerate(single):
        s.set_range(torch.tensor(-[2.0, 4.0][k]), torch.tensor([1.0, 7.0][k]))
    assert torch.allclose(y[0], single[0](x[:1])[0]) and torch.allclose(y[1], single[1](x[1:])[0])


def test_uncalibrated_and_unrouted_quantizers_fail_clearly():
    with pytest.raises(RuntimeError, match="calibrat"):
        ActQuantizer(8)(torch.zeros(2, 3))
    q = ActQuantizer(8, n_groups=3)
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="time step"):
        q(torch.zeros(2, 3))


def test_adaround_init_soft_hard_and_schedule():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 10, generator=g)
    q = WeightQuantizer(tuple(w.shape), 4, "affine")
    q.init_range(w, "minmax")
    rounding = q.start_adaround(w)
    assert q.rounding == "soft"
    codes = w / q.scale[:, None] + q.zero_point[:, None]
    inside = (codes > 0) & (codes < 15)  # the range ends are clamped (zero point is rounded)
    assert torch.allclose(q(w)[inside], w[inside], atol=1e-5)  # h(alpha) = frac(W / scale)
    loss = (q(w) - w.round()).pow(2).sum()
    loss.backward()
    assert rounding.alpha.grad is not None and w.grad is None
    q.harden()
    assert q.rounding == "hard" and q.round_up.dtype == torch.bool
    s, z = q.scale[:, None], q.zero_point[:, None]
    expected = (torch.clamp(torch.floor(w / s) + q.round_up + z, 0, 15) - z) * s
    assert torch.allclose(q(w), expected)
    # hard rounding passes gradients to the FP latent weight (QuEST) through floor's STE
    w_latent = w.clone().requires_grad_(True)
    q(w_latent).sum().backward()
    assert w_latent.grad is not None and w_latent.grad.abs().sum() > 0

    sched = RoundingSchedule(iters=100, weight=0.01, warmup=0.2, beta_start=20, beta_end=2)
    assert sched.beta(0) == 20 and sched.beta(20) == 20 and abs(sched.beta(100) - 2) < 1e-9
    assert 2 < sched.beta(60) < 20
    r = AdaRound(torch.randn(3, 3))
    assert sched.loss(10, [r]).item() == 0.0 and sched.loss(50, [r]).detach().item() > 0
    binary = AdaRound(torch.full((3, 3), 50.0))  # h = 1 everywhere: no regulariser
    assert binary.regularizer(2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_subsampled_lp_search_keeps_the_outliers():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 4096, generator=g)
    x[:, :3] *= 30  # rare outliers: a uniform subsample would miss them and over-clip
    full_lo, full_hi = lp_search_range(x, 4, "affine")
    lo, hi = find_range(x, 4, "affine", "lp", max_elems=16 * 256, generator=g)
    assert torch.allclose(hi / full_hi, torch.ones(16), atol=0.15)
    assert torch.allclose(lo / full_lo, torch.ones(16), atol=0.15)


def test_lp_sample_gathered_block_by_block():
    """The L_p range of one call given in column blocks (attention's query blocks): the full
    min / max, each row's largest |x| in the sample exactly, the rest a uniform sample without
    the top ones, weighted as :func:`find_range` weights its one-piece sample; the range is as
    close to the full search as that of the one-piece sample, and the same seed gives it again."""
    from diffquant.quant.quantizers import _BlockSample

    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 4096, generator=g)
    x[:, 1000:1003] *= 30  # rare outliers inside one block
    full_lo, full_hi = lp_search_range(x, 4, "affine")

    def blockwise(seed: int) -> tuple[_BlockSample, tuple]:
        sample = _BlockSample(16, 16 * 256, torch.Generator().manual_seed(seed))
        for block in x.split(700, dim=1):  # uneven blocks
            sample.add(block)
        return sample, sample.lp_range(4, "affine", 2.4, 80)

    sample, (lo, hi) = blockwise(0)
    assert (
        torch.equal(sample.lo, x.amin(dim=1)) and torch.equal(sample.hi, x.amax(dim=1)) and sample.n == 4096
    )
    top_abs, top_cols, top_x = sample.top
    assert torch.equal(top_abs, x.abs().topk(64, dim=1).values)
    assert torch.equal(top_x, x.gather(1, top_cols))
    _, pool_cols, pool_x = sample.pool
    assert torch.equal(pool_x, x.gather(1, pool_cols)) and pool_cols.shape == (16, 256)
    assert all(len(set(row.tolist())) == 256 for row in pool_cols)  # without replacement
    # over seeds, as unbiased and as close to the full search as the one-piece sample
    errors = {"one piece": [], "blocks": []}
    for seed in range(20):
        one = find_range(
            x, 4, "affine", "lp", max_elems=16 * 256, generator=torch.Generator().manual_seed(seed)
        )
        for kind, (lo_s, hi_s) in (("one piece", one), ("blocks", blockwise(seed)[1])):
            errors[kind].append(torch.cat([hi_s / full_hi, lo_s / full_lo]) - 1)
    one, blocks = (torch.stack(errors[k]) for k in ("one piece", "blocks"))
    assert blocks.mean().abs() < 0.02 and blocks.abs().mean() < 1.25 * one.abs().mean() + 0.01
    assert all(torch.equal(a, b) for a, b in zip((lo, hi), blockwise(0)[1]))
    assert not torch.equal(hi, blockwise(1)[1][1])  # the seed draws the uniform part
    small = _BlockSample(16, 1 << 20, None)  # everything fits the sample: the exact search
    for block in x.split(700, dim=1):
        small.add(block)
    assert all(torch.equal(a, b) for a, b in zip(small.lp_range(4, "affine", 2.4, 80), (full_lo, full_hi)))
