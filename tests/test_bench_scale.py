"""``diffquant.bench.scale``'s floors (the FP step with gradients to the weights or to the inputs
only, the forward's and the step's FLOP counts) and ``diffquant.bench.roofline``'s bounds."""

import math

import pytest
import torch
from torch import nn

from diffquant.bench.roofline import (
    ConvShape,
    iteration_bounds,
    largest_convolution,
    peak_gflop_per_s,
    pooled_comparison,
    ratio_bounds,
)
from diffquant.bench.scale import forward_gflop, fp_train_step_s, step_gflop
from diffquant.calib.reconstruct import CallSpec


def _unit_and_batch():
    torch.manual_seed(0)
    unit = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 1))
    x = torch.randn(2, 4, 5, 5)
    spec = CallSpec((x,), {}, batch=2)
    return unit, spec, spec.rows((x,), {}, "fp_")


def test_forward_gflop_counts_the_convolutions_multiply_adds():
    unit, spec, batch = _unit_and_batch()
    # 2 x (rows x out channels x positions x in channels x kernel), per convolution
    expected = 2 * (2 * 8 * 25 * 4 * 9) + 2 * (2 * 8 * 25 * 8 * 1)
    assert forward_gflop(unit, batch, spec) * 1e9 == pytest.approx(expected)


@pytest.mark.parametrize("grads_to, weights_grad", [("weights", True), ("inputs", False)])
def test_fp_step_differentiates_what_it_names(grads_to, weights_grad):
    unit, spec, batch = _unit_and_batch()
    seen = []
    unit[0].register_forward_hook(
        lambda mod, args, out: seen.append((mod.weight.requires_grad, args[0].requires_grad))
    )
    for p in unit.parameters():
        p.requires_grad_(False)
    seconds = fp_train_step_s(unit, batch, spec, torch.device("cpu"), repeats=1, grads_to=grads_to)
    assert seconds > 0
    assert seen and all(s == (weights_grad, not weights_grad) for s in seen)
    # the weights' flags are as they were
    assert not any(p.requires_grad for p in unit.parameters())
    assert not batch["fp_a0"].requires_grad


def test_fp_step_rejects_an_unknown_gradient_target():
    unit, spec, batch = _unit_and_batch()
    with pytest.raises(ValueError, match="grads_to"):
        fp_train_step_s(unit, batch, spec, torch.device("cpu"), grads_to="activations")


# the two convolutions' forward FLOPs in _unit_and_batch: 2 x rows x out x positions x in x kernel
CONV1, CONV2 = 2 * (2 * 8 * 25 * 4 * 9), 2 * (2 * 8 * 25 * 8 * 1)


def _normed_unit_and_batch():
    """_unit_and_batch's unit behind a GroupNorm (affine): its parameters need the first
    convolution's input gradient, the convolutions' weights do not."""
    unit, spec, batch = _unit_and_batch()
    return nn.Sequential(nn.GroupNorm(2, 4), *unit), spec, batch


@pytest.mark.parametrize(
    "grads_to, backward",
    [
        ("inputs", CONV1 + CONV2),  # both input gradients, no weight gradient
        ("weights", 2 * CONV1 + 2 * CONV2),  # all: the norm's affine needs the first input gradient
        ("layer_weights", CONV1 + 2 * CONV2),  # both weight gradients, the second one's input's
    ],
)
def test_step_gflop_counts_only_the_gradients_asked_for(grads_to, backward):
    unit, spec, batch = _normed_unit_and_batch()
    for p in unit.parameters():
        p.requires_grad_(False)
    work = step_gflop(unit, batch, spec, grads_to=grads_to)
    assert work["forward"] * 1e9 == pytest.approx(CONV1 + CONV2)
    assert work["backward"] * 1e9 == pytest.approx(backward)
    assert not any(p.requires_grad for p in unit.parameters())  # as they were
    assert not batch["fp_a0"].requires_grad


def test_largest_convolution_is_the_one_with_most_flops_as_run():
    unit, spec, batch = _unit_and_batch()
    conv = largest_convolution(unit, lambda: spec.call(unit, batch, "fp_"))
    assert conv == ConvShape((8, 4, 3, 3), (2, 4, 5, 5), (1, 1), (1, 1), (5, 5))
    assert (conv.gemm_m, conv.gemm_k, conv.gemm_n) == (2 * 25, 4 * 9, 8)
    assert conv.gflop * 1e9 == CONV1
    assert largest_convolution(nn.Linear(3, 3), lambda: None) is None


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_peak_is_the_fastest_candidate(precision):
    conv = ConvShape((16, 16, 3, 3), (2, 16, 8, 8), (1, 1), (1, 1), (8, 8))
    rates = peak_gflop_per_s(precision, torch.device("cpu"), conv, n=64, repeats=2)
    assert set(rates) == {"matmul", "conv", "peak"}
    assert rates["peak"] == max(rates["matmul"], rates["conv"]) and math.isfinite(rates["peak"])


def test_bounds_put_each_flop_at_its_precisions_peak():
    work = {"lsq": {"forward": 100.0, "backward": 100.0}, "adaround": {"forward": 100.0, "backward": 150.0}}
    peaks = {"fp32": 100.0, "bf16": 400.0, "int8": 800.0}
    bounds = iteration_bounds(work, peaks)
    assert bounds["lsq"] == pytest.approx(
        {"s_at_fp32_peak": 2.0, "s_at_bf16_peak": 0.5, "s_at_int8_forward_peak": 100 / 800 + 100 / 400}
    )
    assert bounds["adaround"] == pytest.approx({"s_at_fp32_peak": 2.5, "s_at_bf16_peak": 0.625})
    runs = [  # two scale_vs_baseline results; the second has no AdaRound
        {"units": {"resnet": {"lsq_baseline_s": [1.0, 1.5], "lsq_current_s": [0.5, 0.6], "lsq_ratio": 0.4}}},
        {"units": {"resnet": {"lsq_baseline_s": [1.25], "lsq_current_s": [0.625], "fp_train_step_s": {}}}},
    ]
    pooled = pooled_comparison(runs)
    assert pooled == {"resnet": {"lsq_baseline_s": [1.0, 1.5, 1.25], "lsq_current_s": [0.5, 0.6, 0.625]}}
    assert ratio_bounds(bounds, pooled["resnet"]) == {
        "lsq_ratio_at_fp32_peak": 1.6,
        "lsq_ratio_at_bf16_peak": 0.4,
        "lsq_ratio_at_int8_forward_peak": 0.3,
        "lsq_ratio_measured": 0.48,
    }


def test_peak_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        peak_gflop_per_s("fp8", torch.device("cpu"))
