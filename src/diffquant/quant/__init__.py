"""Fake quantization of a model's denoiser (torchao/ModelOpt-style API).

summary = quantize_denoiser(model.denoiser, model.spec, quant_cfg,
                            timesteps=model.timesteps)                           # swap modules
calibrate_act_ranges(model.denoiser, stream)                                     # diffquant.calib
with quant_state(model.denoiser, weights=False, acts=False):                     # the FP teacher
    ...
quant_parameters(model.denoiser, "act_scale", include=r"attn")                   # for training
save_quantized(model.denoiser, path, quant_cfg); load_quantized(fresh.denoiser, fresh.spec, path)
"""

from diffquant.quant.adaround import AdaRound, RoundingSchedule
from diffquant.quant.attention import QuantAttnProcessor, is_quant_attention
from diffquant.quant.checkpoint import (
    load_quant_state,
    load_quantized,
    quantizer_state_dict,
    read_checkpoint,
    save_quantized,
)
from diffquant.quant.config import FP_BITS, QuantConfig, validate_bits
from diffquant.quant.modules import QuantConv2d, QuantLinear, is_quant_layer
from diffquant.quant.quantizers import (
    ActQuantizer,
    SplitActQuantizer,
    SplitWeightQuantizer,
    TokenActQuantizer,
    WeightQuantizer,
    fake_quant,
    find_range,
    int_range,
    lp_search_range,
    range_to_qparams,
    round_ste,
)
from diffquant.quant.state import (
    PARAM_KINDS,
    frozen_weights,
    is_quantized,
    iter_quantizers,
    keep_fp_weights,
    quant_parameters,
    quant_state,
    set_quant_state,
)
from diffquant.quant.swap import QuantSummary, quantize_denoiser
from diffquant.quant.timestep import (
    TimestepRouter,
    attach_timestep_router,
    get_router,
    set_group_index,
    set_timestep,
)

__all__ = [
    "AdaRound",
    "RoundingSchedule",
    "QuantAttnProcessor",
    "is_quant_attention",
    "load_quant_state",
    "load_quantized",
    "quantizer_state_dict",
    "read_checkpoint",
    "save_quantized",
    "FP_BITS",
    "QuantConfig",
    "validate_bits",
    "QuantConv2d",
    "QuantLinear",
    "is_quant_layer",
    "ActQuantizer",
    "SplitActQuantizer",
    "TokenActQuantizer",
    "SplitWeightQuantizer",
    "WeightQuantizer",
    "fake_quant",
    "find_range",
    "int_range",
    "lp_search_range",
    "range_to_qparams",
    "round_ste",
    "PARAM_KINDS",
    "is_quantized",
    "iter_quantizers",
    "keep_fp_weights",
    "quant_parameters",
    "quant_state",
    "frozen_weights",
    "set_quant_state",
    "QuantSummary",
    "quantize_denoiser",
    "TimestepRouter",
    "attach_timestep_router",
    "get_router",
    "set_group_index",
    "set_timestep",
]
