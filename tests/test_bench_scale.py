"""``diffquant.bench.scale``'s floors: the FP step with gradients to the weights or to the inputs
only, and the forward's FLOP count."""

import pytest
import torch
from torch import nn

from diffquant.bench.scale import forward_gflop, fp_train_step_s
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
