"""Module swapping on tiny random-weight UNets: coverage (every Conv2d/Linear and attention matmul
quantized exactly once), policies (first/last, shortcut split), switches and look-ups."""

import pytest
import torch
from torch import Tensor, nn

from diffquant.calib import observing_act_ranges
from diffquant.models.denoiser import UNET
from diffquant.quant import (
    ActQuantizer,
    QuantAttnProcessor,
    QuantConfig,
    WeightQuantizer,
    is_quant_layer,
    iter_quantizers,
    keep_fp_weights,
    quant_parameters,
    quant_state,
    quantize_denoiser,
    set_quant_state,
)
from diffquant.validation import InvalidSetting
from tiny_models import tiny_unet2d, tiny_unet2d_condition, unet2d_condition_inputs, unet2d_inputs

torch.set_num_threads(1)

MODELS = {
    "unet2d": (tiny_unet2d, unet2d_inputs),
    "unet2d_condition": (tiny_unet2d_condition, unet2d_condition_inputs),
}


def _observe(denoiser, inputs, method="minmax"):
    """Set activation ranges from one batch (the calibration code path, without a stream)."""
    with observing_act_ranges(denoiser, method), torch.no_grad():
        denoiser(**inputs)


def _quantized(name, cfg):
    build, make_inputs = MODELS[name]
    denoiser, inputs = build(), make_inputs()
    with torch.no_grad():
        ref = UNET.forward(denoiser, inputs)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in denoiser.modules())
    n_attn = sum(type(m).__name__ == "Attention" for m in denoiser.modules())
    summary = quantize_denoiser(denoiser, UNET, cfg)
    _observe(denoiser, inputs)
    return denoiser, inputs, ref, summary, n_layers, n_attn


@pytest.mark.parametrize("name", list(MODELS))
def test_every_layer_and_matmul_quantized_exactly_once(name):
    cfg = QuantConfig(name="w8a8", weight_bits=8, act_bits=8)
    denoiser, inputs, _, summary, n_layers, n_attn = _quantized(name, cfg)
    layers = [m for m in denoiser.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(is_quant_layer(m) for m in layers) and len(layers) == n_layers
    assert summary.n_quant_layers == n_layers and summary.attention == n_attn > 0
    procs = [m for m in denoiser.modules() if isinstance(m, QuantAttnProcessor)]
    assert len(procs) == n_attn
    assert all(None not in (p.q_quantizer, p.k_quantizer, p.v_quantizer, p.prob_quantizer) for p in procs)
    assert all(m.weight_quantizer is not None and m.input_quantizer is not None for m in layers)

    calls: dict[str, int] = {}
    handles = [
        q.register_forward_hook(lambda mod, a, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        for n, q in iter_quantizers(denoiser)
    ]
    with torch.no_grad():
        denoiser(**inputs)
    for h in handles:
        h.remove()
    names = [n for n, _ in iter_quantizers(denoiser)]
    assert calls == {n: 1 for n in names}  # every quantizer ran, and ran once
    matmul_qs = [n for n in names if ".processor." in n]
    assert len(matmul_qs) == 4 * n_attn  # q, k, v, softmax per attention


@pytest.mark.parametrize("name", list(MODELS))
def test_quant_off_is_fp_and_w8a8_is_close(name):
    cfg = QuantConfig(name="w8a8", weight_bits=8, act_bits=8)
    denoiser, inputs, ref, *_ = _quantized(name, cfg)
    with torch.no_grad(), quant_state(denoiser, weights=False, acts=False):
        fp = UNET.forward(denoiser, inputs)
    assert torch.allclose(fp, ref, atol=1e-5)
    with torch.no_grad():
        q8 = UNET.forward(denoiser, inputs)
    rel = ((q8 - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05


def test_first_last_bits_split_shortcuts_and_fp_parts():
    cfg = QuantConfig(name="w4a4", weight_bits=4, act_bits=4, first_last_act_bits=8)
    denoiser = tiny_unet2d()
    inputs = unet2d_inputs()
    # the true split: channels of hidden_states before cat([hidden_states, skip]) in up blocks
    true_splits = {}

    def up_hook(block_name):
        def hook(mod, args, kwargs):
            skips = list(kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else ()))
            for j, resnet in enumerate(mod.resnets):
                skip = skips[-(j + 1)]
                true_splits[f"{block_name}.resnets.{j}.conv_shortcut"] = resnet.in_channels - skip.shape[1]

        return hook

    handles = [
        b.register_forward_pre_hook(up_hook(f"up_blocks.{k}"), with_kwargs=True)
        for k, b in enumerate(denoiser.up_blocks)
    ]
    with torch.no_grad():
        denoiser(**inputs)
    for h in handles:
        h.remove()
    assert UNET.shortcut_splits(denoiser) == true_splits and len(true_splits) == 4

    summary = quantize_denoiser(denoiser, UNET, cfg)
    assert sorted(summary.split_shortcuts) == sorted(true_splits)
    assert denoiser.conv_in.input_quantizer.bits == 8 and denoiser.conv_out.input_quantizer.bits == 8
    assert denoiser.conv_in.weight_quantizer.bits == 4
    assert denoiser.down_blocks[0].resnets[0].conv1.input_quantizer.per_channel  # A4: per channel
    sc = denoiser.up_blocks[0].resnets[0].conv_shortcut
    assert sc.input_quantizer.split == true_splits["up_blocks.0.resnets.0.conv_shortcut"]
    assert sc.weight_quantizer.head.weight_shape[1] == sc.input_quantizer.split
    assert not any(
        isinstance(m, (WeightQuantizer, ActQuantizer)) for m in denoiser.class_embedding.modules()
    )  # embeddings, norms stay FP
    _observe(denoiser, inputs)
    with torch.no_grad():
        assert torch.isfinite(UNET.forward(denoiser, inputs)).all()


def test_switches_and_parameter_lookup():
    cfg = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)
    denoiser, inputs, ref, *_ = _quantized("unet2d_condition", cfg)
    with quant_state(denoiser, weights=False):
        assert not any(q.enabled for _, q in iter_quantizers(denoiser, "weight"))
        assert all(q.enabled for _, q in iter_quantizers(denoiser, "act"))
    assert all(q.enabled for _, q in iter_quantizers(denoiser))  # restored
    previous = set_quant_state(denoiser, acts=False)
    assert not any(q.enabled for _, q in iter_quantizers(denoiser, "act")) and all(previous.values())
    set_quant_state(denoiser, acts=True)

    scales = quant_parameters(denoiser, "act_scale")
    assert len(scales) == len(list(iter_quantizers(denoiser, "act")))
    ff = quant_parameters(denoiser, "weight_latent", include=r"ff\.net")
    assert ff and all(".ff.net." in n for n in ff)
    assert (
        ff["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight"]
        is denoiser.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2].weight
    )
    attn_k = quant_parameters(denoiser, "act_scale", include=r"attn1\.", exclude=r"to_")
    assert attn_k and all(".processor." in n for n in attn_k)
    assert quant_parameters(denoiser, "weight_round") == {}  # no AdaRound running
    assert quant_parameters(denoiser, "act_scale", max_bits=7) == {}
    with pytest.raises(ValueError, match="unknown parameter kind"):
        quant_parameters(denoiser, "scales")


def test_fp_teacher_survives_latent_weight_finetuning():
    cfg = QuantConfig(name="w4a8", weight_bits=4, act_bits=8)
    denoiser, inputs, ref, *_ = _quantized("unet2d_condition", cfg)
    assert keep_fp_weights(denoiser, include=r"ff\.net") == 2 * 4  # 4 transformer blocks
    params = quant_parameters(denoiser, "weight_latent", include=r"ff\.net")
    with torch.no_grad():
        q_before = UNET.forward(denoiser, inputs)
        for p in params.values():
            p.add_(0.05)
        with quant_state(denoiser, weights=False, acts=False):
            # the teacher is unchanged
            assert torch.allclose(UNET.forward(denoiser, inputs), ref, atol=1e-5)
        assert not torch.allclose(UNET.forward(denoiser, inputs), q_before)  # student moved


def test_timestep_aware_groups_follow_the_timestep_argument():
    schedule = [901, 701, 501, 301, 101, 1]
    cfg = QuantConfig(name="w8a8", weight_bits=8, act_bits=8, timestep_aware=True, timestep_groups=3)
    denoiser, inputs = tiny_unet2d(), unet2d_inputs(n=6)
    inputs["timestep"] = torch.tensor(schedule)
    quantize_denoiser(denoiser, UNET, cfg, timesteps=schedule)
    _observe(denoiser, inputs)
    q = denoiser.down_blocks[0].resnets[0].conv1.input_quantizer
    assert q.scale.shape == (3, 1) and q.group_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(set(q.scale.detach().flatten().tolist())) == 3  # each group its own range
    with torch.no_grad():
        denoiser(**{**inputs, "timestep": torch.tensor([1, 1, 1, 1, 1, 900])})
    assert q.group_index.tolist() == [2, 2, 2, 2, 2, 0]
    with pytest.raises(ValueError, match="timesteps"):
        quantize_denoiser(tiny_unet2d(), UNET, cfg)


def test_weight_only_and_requantize_errors():
    denoiser = tiny_unet2d()
    summary = quantize_denoiser(denoiser, UNET, QuantConfig(name="w4a32", weight_bits=4, act_bits=32))
    assert summary.attention == 0 and not list(iter_quantizers(denoiser, "act"))
    with torch.no_grad():
        assert torch.isfinite(UNET.forward(denoiser, unet2d_inputs())).all()
    with pytest.raises(ValueError, match="already quantized"):
        quantize_denoiser(denoiser, UNET, QuantConfig(name="w8a8", weight_bits=8, act_bits=8))
    # impossible bits are rejected before any work: by the config itself, and by
    # quantize_denoiser for a plain mapping
    with pytest.raises(InvalidSetting, match="weight_bits"):
        QuantConfig(name="bad", weight_bits=1, act_bits=8)
    with pytest.raises(ValueError, match="weight_bits"):
        quantize_denoiser(tiny_unet2d(), UNET, {"name": "bad", "weight_bits": 1, "act_bits": 8})


@pytest.mark.parametrize("name", list(MODELS))
def test_attention_in_query_blocks(name, monkeypatch):
    """The quantized probabilities are formed one block of queries at a time, with and without
    gradients alike; at this size one query per block gives all queries' values bit for bit, and
    range observation (one range per call) sees all queries at once."""
    import diffquant.quant.attention as attention

    cfg = QuantConfig(name="w4a4", weight_bits=4, act_bits=4)
    denoiser, inputs, *_ = _quantized(name, cfg)
    with torch.no_grad():
        whole = UNET.forward(denoiser, inputs)
    monkeypatch.setattr(attention, "ATTENTION_BLOCK_ELEMENTS", 1)  # one query per block
    seen: list[int] = []
    procs = [m for m in denoiser.modules() if isinstance(m, QuantAttnProcessor)]
    handle = procs[0].prob_quantizer.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[2]))
    with torch.no_grad():
        blocks = UNET.forward(denoiser, inputs)
    assert set(seen) == {1} and len(seen) > 1  # really one query at a time
    assert torch.equal(blocks, whole)
    procs[0].prob_quantizer.scale.requires_grad_(True)  # LSQ on the probabilities: the same blocks
    trained = UNET.forward(denoiser, inputs)
    assert torch.equal(trained.detach(), blocks)
    trained.sum().backward()
    assert procs[0].prob_quantizer.scale.grad.abs().sum() > 0
    handle.remove()
    # large calls form each block's probabilities again in the backward pass: the same gradients
    grads, calls, recomputed = {}, {}, []
    real_checkpoint = attention.checkpoint
    monkeypatch.setattr(
        attention, "checkpoint", lambda *a, **k: (recomputed.append(1), real_checkpoint(*a, **k))[1]
    )
    default = attention.CHECKPOINT_PROBS_BYTES
    for limit in (default, 0):
        monkeypatch.setattr(attention, "CHECKPOINT_PROBS_BYTES", limit)
        denoiser.zero_grad()
        out = UNET.forward(denoiser, inputs)
        assert torch.equal(out.detach(), blocks)
        out.square().sum().backward()
        grads[limit] = procs[0].prob_quantizer.scale.grad.clone()
        calls[limit] = len(recomputed)
    assert torch.equal(grads[0], grads[default]) and grads[0].abs().sum() > 0
    assert calls[default] == 0 < calls[0]  # recomputed only above the limit


def _prob_ranges(denoiser) -> list[Tensor]:
    return [
        m.prob_quantizer.scale.detach().clone()
        for m in denoiser.modules()
        if isinstance(m, QuantAttnProcessor)
    ]


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("method", ["minmax", "lp"])
def test_range_observation_in_query_blocks(method, quantize, monkeypatch):
    """While the probabilities' quantizer observes ranges, attention is formed in query blocks too
    (twice: observed, then the output), and the ranges are those of all queries at once, up to
    float rounding (one query's scores are a matrix-vector product, not a matrix product): min /
    max, and the L_p search (every score in its loss at this size). Passing activations through,
    so are the outputs. Q-Diffusion's way (``quantize``: each quantizer quantizes with the range
    set on its first input) is compared at the first attention only: at 4 bits a last-bit
    difference flips roundings downstream, and with them the later ranges."""
    import copy

    import diffquant.quant.attention as attention
    import diffquant.quant.quantizers as quantizers

    cfg = QuantConfig(name="w4a4", weight_bits=4, act_bits=4)
    base, inputs, *_ = _quantized("unet2d_condition", cfg)
    results, widths = [], []
    add = quantizers._BlockSample.add
    monkeypatch.setattr(
        quantizers._BlockSample, "add", lambda self, x: (widths.append(x.shape[1]), add(self, x))
    )
    for block in (attention.ATTENTION_BLOCK_ELEMENTS, 1):
        monkeypatch.setattr(attention, "ATTENTION_BLOCK_ELEMENTS", block)
        denoiser = copy.deepcopy(base)
        widths = []
        with observing_act_ranges(denoiser, method, quantize=quantize), torch.no_grad():
            out = UNET.forward(denoiser, inputs)
        results.append((out, _prob_ranges(denoiser), widths))
    (whole, whole_ranges, none), (blocks, block_ranges, widths) = results
    assert not none and len(widths) > 2 * len(block_ranges)  # whole calls at once, or many blocks
    compared = block_ranges[:1] if quantize else block_ranges
    assert all(torch.allclose(a, b, rtol=1e-5, atol=0) for a, b in zip(whole_ranges, compared))
    if not quantize:
        assert torch.allclose(blocks, whole, rtol=0, atol=1e-5 * whole.abs().max().item())
