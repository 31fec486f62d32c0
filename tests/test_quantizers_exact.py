"""The fast paths of the quantizers against the plain implementations they replace (kept here):
the blocked L_p range search, the cached floor(W/Δ) and fused soft rounding of AdaRound, the
host-side ``initialized`` flag of activation quantizers. Everything is compared bit for bit."""

import copy
import math
import pickle

import pytest
import torch

from diffquant.quant import ActQuantizer, AdaRound, RoundingSchedule, WeightQuantizer
from diffquant.quant.adaround import GAMMA, ZETA
from diffquant.quant.quantizers import (
    SplitWeightQuantizer,
    TokenActQuantizer,
    _lp_losses,
    fake_quant,
    int_range,
    lp_search_range,
    range_to_qparams,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- references
def ref_lp_search_range(x2d, bits, mode, p=2.4, n_candidates=80):
    """The candidate-by-candidate search as it was (28ec9d6), unweighted."""
    x2d = x2d.float()
    lo0, hi0 = x2d.amin(dim=1), x2d.amax(dim=1)
    q_min, q_max = int_range(bits, mode)
    best = torch.full_like(lo0, math.inf)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(n_candidates):
        ratio = 1.0 - 0.01 * i
        c_lo, c_hi = lo0 * ratio, hi0 * ratio
        scale, zp = range_to_qparams(c_lo, c_hi, bits, mode)
        err = (fake_quant(x2d, scale[:, None], zp[:, None], q_min, q_max) - x2d).abs_().pow_(p)
        loss = err.mean(dim=1)
        better = loss < best
        best = torch.where(better, loss, best)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


def ref_losses(x2d, bits, mode, p=2.4, n_candidates=80):
    """``(K, C)`` losses of the reference loop."""
    lo0, hi0 = x2d.amin(dim=1), x2d.amax(dim=1)
    q_min, q_max = int_range(bits, mode)
    out = []
    for i in range(n_candidates):
        ratio = 1.0 - 0.01 * i
        scale, zp = range_to_qparams(lo0 * ratio, hi0 * ratio, bits, mode)
        err = (fake_quant(x2d, scale[:, None], zp[:, None], q_min, q_max) - x2d).abs_().pow_(p)
        out.append(err.mean(dim=1))
    return torch.stack(out)


def ref_soft_forward(q: WeightQuantizer, weight):
    """The soft-rounding forward as it was: floor recomputed, autograd through every op."""
    scale = q.scale.view(-1, *([1] * (weight.dim() - 1)))
    zp = q.zero_point.view(-1, *([1] * (weight.dim() - 1)))
    h = torch.clamp(torch.sigmoid(q.adaround.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
    w_int = torch.floor(weight.detach() / scale) + h
    w_int = torch.clamp(w_int + zp, q.q_min, q.q_max)
    return (w_int - zp) * scale


def _weights(kind, shape, g):
    w = torch.randn(*shape, generator=g)
    if kind == "realish":  # kaiming scale, per-channel spread, a few outliers
        fan_in = math.prod(shape[1:])
        w = w / math.sqrt(fan_in) * (0.2 + torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g))
        w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 500),), generator=g)] *= 8
    elif kind == "ties":  # grid values, constant and zero rows: many candidates tie
        w = torch.randint(-7, 8, shape, generator=g).float() * 0.25
        w[0] = 0.0
        if shape[0] > 2:
            w[1] = 0.5
            w[2] = -0.25
    return w


SHAPES = [(8, 3, 3, 3), (64, 32, 3, 3), (33, 577), (1, 3001), (7, 5, 1, 1), (257, 129), (40, 17, 3, 3)]


# ---------------------------------------------------------------------------- L_p search
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["randn", "realish", "ties"])
def test_lp_init_range_bit_identical(shape, kind):
    g = torch.Generator().manual_seed(hash((shape, kind)) % 1000)
    w = _weights(kind, shape, g)
    for bits, mode in [(4, "affine"), (8, "affine"), (2, "affine"), (4, "symmetric"), (3, "symmetric")]:
        q = WeightQuantizer(shape, bits, mode)
        q.init_range(w, "lp")
        lo, hi = ref_lp_search_range(w.reshape(shape[0], -1), bits, mode)
        scale, zp = range_to_qparams(lo, hi, bits, mode)
        assert torch.equal(q.scale, scale) and torch.equal(q.zero_point, zp), (bits, mode)
    x = w.reshape(shape[0], -1).abs()
    assert all(
        torch.equal(a, b)
        for a, b in zip(lp_search_range(x, 8, "unsigned"), ref_lp_search_range(x, 8, "unsigned"))
    )


@pytest.mark.parametrize("shape", [(257, 129), (100, 1001), (896, 17), (5, 70001), (3, 7)])
def test_lp_losses_bit_identical_across_blocks(shape):
    """The row blocks must give every element the same pow routine as the whole-tensor call:
    compare the losses themselves, not only the winner (shapes with odd rows and several
    blocks, whose tensor end is not a multiple of the vector step)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    lo0, hi0 = x.amin(1), x.amax(1)
    ratios = torch.tensor([1.0 - 0.01 * i for i in range(80)])
    losses = _lp_losses(x, lo0[:, None] * ratios, hi0[:, None] * ratios, 4, "affine", 2.4)
    assert torch.equal(losses, ref_losses(x, 4, "affine"))


def test_lp_search_multithreaded_and_few_candidates():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 301, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = lp_search_range(x, 4, "affine")
        ref_two = ref_lp_search_range(x, 4, "affine")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(two[0], ref_two[0]) and torch.equal(two[1], ref_two[1])
    for k in (1, 7, 100):
        a, b = (
            lp_search_range(x, 4, "affine", n_candidates=k),
            ref_lp_search_range(x, 4, "affine", n_candidates=k),
        )
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # a transposed (non-contiguous) input takes the loop: same answer as its contiguous copy's loop
    xt = torch.randn(301, 40, generator=g).t()
    a, b = lp_search_range(xt, 4, "affine"), ref_lp_search_range(xt, 4, "affine")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------- AdaRound
def _soft_pair(shape, bits=4, seed=0, mode="affine"):
    g = torch.Generator().manual_seed(seed)
    w = _weights("realish", shape, g)
    q = WeightQuantizer(shape, bits, mode)
    q.init_range(w, "minmax")
    q.start_adaround(w)
    with torch.no_grad():  # spread α over both clamp ends of h and past the code range
        q.adaround.alpha.add_(torch.randn(shape, generator=g) * 4)
        q.adaround.alpha.view(-1)[::7] = 30.0
        q.adaround.alpha.view(-1)[::11] = -30.0
    ref = copy.deepcopy(q)
    return w, q, ref


@pytest.mark.parametrize(
    "shape,bits,mode", [((16, 8, 3, 3), 4, "affine"), ((33, 65), 2, "affine"), ((12, 20), 4, "symmetric")]
)
def test_soft_rounding_outputs_grads_and_adam_steps_bit_identical(shape, bits, mode):
    w, q, ref = _soft_pair(shape, bits, mode=mode)
    sched = RoundingSchedule(iters=4, warmup=0.25)
    opt = torch.optim.Adam([q.adaround.alpha], lr=0.01)
    opt_ref = torch.optim.Adam([ref.adaround.alpha], lr=0.01)
    target = w + 0.01 * torch.randn(shape, generator=torch.Generator().manual_seed(9))
    for it in range(4):
        out, out_ref = q(w), ref_soft_forward(ref, w)
        assert torch.equal(out, out_ref)
        loss = (out - target).abs().pow(2.0).mean() + sched.loss(it, [q.adaround])
        loss_ref = (out_ref - target).abs().pow(2.0).mean() + sched.loss(it, [ref.adaround])
        assert torch.equal(loss, loss_ref)
        opt.zero_grad(set_to_none=True)
        opt_ref.zero_grad(set_to_none=True)
        loss.backward()
        loss_ref.backward()
        assert torch.equal(q.adaround.alpha.grad, ref.adaround.alpha.grad)
        opt.step()
        opt_ref.step()
        assert torch.equal(q.adaround.alpha, ref.adaround.alpha)
    with torch.no_grad():
        assert torch.equal(q(w), ref_soft_forward(ref, w))


def test_soft_rounding_in_a_conv_and_split_quantizer():
    w, q, ref = _soft_pair((8, 6, 3, 3))
    x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(3))
    y = torch.nn.functional.conv2d(x, q(w), padding=1)
    y_ref = torch.nn.functional.conv2d(x, ref_soft_forward(ref, w), padding=1)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(q.adaround.alpha.grad, ref.adaround.alpha.grad)
    # split quantizer: the halves are views of the weight; the cache must hit and stay right
    weight = torch.nn.Parameter(torch.randn(6, 10, 3, 3, generator=torch.Generator().manual_seed(4)))
    sq = SplitWeightQuantizer(tuple(weight.shape), 4, 4)
    sq.init_range(weight.detach(), "minmax")
    sq.start_adaround(weight)
    first = sq(weight)
    assert sq.head._floor_cache is not None
    cached = sq.head._floor_cache[1]
    assert torch.equal(sq(weight), first) and sq.head._floor_cache[1] is cached
    expected = torch.cat(
        [ref_soft_forward(sq.head, weight[:, :4]), ref_soft_forward(sq.tail, weight[:, 4:])], 1
    )
    assert torch.equal(first, expected)


def test_floor_cache_never_stale():
    weight = torch.nn.Parameter(torch.randn(8, 12, generator=torch.Generator().manual_seed(5)))
    q = WeightQuantizer(tuple(weight.shape), 4)
    q.init_range(weight.detach(), "minmax")
    q.start_adaround(weight)
    check = lambda w: torch.equal(q(w), ref_soft_forward(q, w))  # noqa: E731
    assert check(weight)
    with torch.no_grad():
        weight.add_(0.3)  # in-place update (an optimizer step): version bump
    assert check(weight)
    opt = torch.optim.SGD([weight], lr=1.0)
    weight.grad = torch.full_like(weight, 0.2)
    opt.step()
    assert check(weight)
    q.init_range(weight.detach() * 3, "minmax")  # new Δ
    assert check(weight)
    with torch.no_grad():
        q.scale.mul_(0.5)  # Δ changed in place
    assert check(weight)
    other = weight.detach().clone() - 0.2  # another tensor
    assert check(other)
    for _ in range(3):  # fresh tensors, possibly at a recycled address, never alias
        assert check(weight.detach() * 1.7)
    saved = weight.data
    weight.data = saved + 0.45  # storage swap
    assert check(weight)
    weight.data = saved
    assert check(weight)
    # copies and pickles drop the cache (weak references); the copy computes its own
    dup = copy.deepcopy(q)
    assert dup._floor_cache is None and torch.equal(dup(weight), ref_soft_forward(q, weight))
    back = pickle.loads(pickle.dumps(q))
    assert torch.equal(back(weight), ref_soft_forward(q, weight))
    q.harden()
    assert q._floor_cache is None


def test_overridden_rectified_is_honoured():
    """A subclass that redefines h(α) (AccuQuant's hard-forward rounding) takes the autograd path."""

    class Hard(AdaRound):
        def rectified(self):
            h = super().rectified()
            return (self.alpha.detach() >= 0).to(h.dtype) + h - h.detach()

    w, q, _ = _soft_pair((6, 10))
    q.adaround = Hard(q.adaround.alpha.detach())
    assert not q.adaround.fused()
    s, z = q.scale[:, None], q.zero_point[:, None]
    expected = (
        torch.clamp(torch.floor(w / s) + (q.adaround.alpha >= 0).float() + z, q.q_min, q.q_max) - z
    ) * s
    out = q(w)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert q.adaround.alpha.grad is not None


def test_rounding_schedule_zero_on_alpha_device():
    r = AdaRound(torch.zeros(3, 3, device="meta"))
    sched = RoundingSchedule(iters=10)
    assert sched.loss(0, [r]).device.type == "meta"
    assert sched.loss(0, []).device.type == "cpu"


# ---------------------------------------------------------------------------- initialized flag
def test_act_quantizer_reads_initialized_only_until_set(monkeypatch):
    x = torch.randn(2, 3)
    q = ActQuantizer(8)
    with pytest.raises(RuntimeError, match="used before its range was calibrated"):
        q(x)
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    calls = []
    real = ActQuantizer._check_initialized
    monkeypatch.setattr(ActQuantizer, "_check_initialized", lambda self: calls.append(1) or real(self))
    for _ in range(3):
        q(x)
    assert calls == []  # no buffer read (a GPU sync) per forward
    # other code writing the buffer directly (QuEST's init) is picked up on first use, once
    q2 = ActQuantizer(8)
    q2.initialized.fill_(True)
    q2(x), q2(x)
    assert calls == [1]
    # state dicts carry it both ways
    fresh = ActQuantizer(8)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    q.load_state_dict(ActQuantizer(8).state_dict())
    with pytest.raises(RuntimeError, match="used before its range was calibrated"):
        q(x)
    # calibration sets it; the token quantizer is always ready
    q3 = ActQuantizer(8)
    q3.start_observing("minmax")
    q3(x)
    q3.finish_observing()
    assert q3._ready and torch.equal(q3(x), q3(x))
    assert TokenActQuantizer(8)._ready
    assert copy.deepcopy(q3)._ready and pickle.loads(pickle.dumps(q3))._ready


# ---------------------------------------------------------------------------- compiled kernels
def _rounding(shape, bits, mode, seed):
    """An AdaRound over a random weight of ``shape`` with per-channel min-max parameters, the
    weight's floor codes, scale and zero point (broadcast shapes), and q_min / q_max."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    dims = tuple(range(1, w.dim()))
    scale, zp = range_to_qparams(w.amin(dim=dims), w.amax(dim=dims), bits, mode)
    scale, zp = (t.reshape(-1, *[1] * (w.dim() - 1)) for t in (scale, zp))
    q_min, q_max = int_range(bits, mode)
    return AdaRound.from_weight(w, scale), torch.floor(w / scale), scale, zp, q_min, q_max


def _values_and_grads(rounding, w_floor, scale, zp, q_min, q_max):
    """[(value, α gradient)] of the soft-rounded weight (against a fixed ramp of output
    gradients) and of the regulariser at β = 20, 7.3, 2."""
    out = []
    for beta in (None, 20.0, 7.3, 2.0):
        rounding.alpha.grad = None
        if beta is None:
            value = rounding.soft_quant(w_floor, scale, zp, q_min, q_max)
            value.backward(torch.linspace(-1, 1, value.numel()).reshape(value.shape))
        else:
            value = rounding.regularizer(beta)
            value.backward()
        out.append((value.detach(), rounding.alpha.grad.clone()))
    return out


def test_compiled_adaround_kernels_match_the_eager_ones():
    """``compiled``: the soft-rounded weight and the regulariser (values and α gradients) agree
    with the eager kernels to float rounding, for conv and linear weights, affine and symmetric,
    and new shapes of a rank and β changing every iteration reuse the compiled kernels (β is
    passed as a tensor; the integer range is part of the kernel)."""
    import torch._dynamo

    graphs = torch._dynamo.utils.counters["stats"]
    for i, (shape, mode) in enumerate(
        [((6, 5, 3, 3), "affine"), ((7, 9), "symmetric"), ((11, 4, 3, 3), "affine"), ((3, 13), "symmetric")]
    ):
        rounding, w_floor, scale, zp, q_min, q_max = _rounding(shape, 4, mode, seed=i)
        with torch.no_grad():
            rounding.alpha.add_(torch.randn(shape, generator=torch.Generator().manual_seed(9)))
        results = {}
        for flag in (False, True):
            rounding.compiled = flag
            results[flag] = _values_and_grads(rounding, w_floor, scale, zp, q_min, q_max)
        for (v_eager, g_eager), (v_comp, g_comp) in zip(results[False], results[True]):
            assert torch.allclose(v_comp, v_eager, rtol=1e-6, atol=1e-7 * float(scale.max()))
            assert torch.allclose(g_comp, g_eager, rtol=1e-5, atol=1e-6 * float(g_eager.abs().max()))
        assert not torch.equal(results[True][1][1], results[True][2][1])  # β reached the kernel
        if i == 1:  # both ranks compiled: new shapes and β values reuse the kernels
            seen = graphs["unique_graphs"]
    assert graphs["unique_graphs"] == seen
    rounding.compiled = True
    with torch.no_grad():  # without gradients the eager fused kernel serves
        assert torch.equal(rounding.soft_quant(w_floor, scale, zp, q_min, q_max), results[False][0][0])


def test_announced_beta_puts_the_regulariser_in_the_soft_rounding_kernel(monkeypatch):
    """After :meth:`RoundingSchedule.announce`, a compiled soft rounding computes the regulariser
    in the same kernel, and ``schedule.loss`` takes it from there (no kernel of its own): values
    and α gradients agree with the eager kernels; during the warm-up nothing is announced.
    Under bf16 autocast the compiled soft rounding writes the bf16 weight autocast would make."""
    from diffquant.quant import adaround

    calls = []
    real = adaround.compiled
    monkeypatch.setattr(adaround, "compiled", lambda fn: calls.append(fn.__name__) or real(fn))
    schedule = RoundingSchedule(iters=10)
    rounding, w_floor, scale, zp, q_min, q_max = _rounding((6, 5, 3, 3), 4, "affine", seed=3)
    with torch.no_grad():
        rounding.alpha.add_(torch.randn(rounding.alpha.shape, generator=torch.Generator().manual_seed(9)))
    ramp = torch.linspace(-1, 1, w_floor.numel()).reshape(w_floor.shape)

    def step(it, compiled):
        rounding.compiled, rounding.alpha.grad = compiled, None
        schedule.announce(it, [rounding])
        w = rounding.soft_quant(w_floor, scale, zp, q_min, q_max)
        penalty = schedule.loss(it, [rounding])
        ((w * ramp).sum() + penalty).backward()
        return w.detach(), penalty.detach(), rounding.alpha.grad.clone()

    for it in (1, 5, 9):  # warm-up (it < 2), then β = 16.6, 2
        calls.clear()
        (w_e, p_e, g_e), (w_c, p_c, g_c) = step(it, False), step(it, True)
        assert calls == (["soft_quant_expr"] if it < 2 else ["soft_quant_penalty_expr"])
        assert (rounding.penalty_beta is None) == (it < 2)
        assert torch.allclose(w_c, w_e, rtol=1e-6, atol=1e-7 * float(scale.max()))
        assert torch.allclose(p_c, p_e, rtol=1e-5) and (it < 2) == (float(p_e) == 0.0)
        assert torch.allclose(g_c, g_e, rtol=1e-5, atol=1e-6 * float(g_e.abs().max()))
    # a β other than the announced one, or a second call: computed on its own
    assert torch.allclose(rounding.regularizer(3.0), adaround.regularizer_expr(rounding.alpha, 3.0))

    rounding.compiled = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w_bf16 = rounding.soft_quant(w_floor, scale, zp, q_min, q_max)
    assert w_bf16.dtype == torch.bfloat16
    assert torch.equal(
        w_bf16, adaround.soft_quant_expr(rounding.alpha, w_floor, scale, zp, q_min, q_max).bfloat16()
    )
