"""The CompVis ``UNetModel`` (``ldm.modules.diffusionmodules.openaimodel``) in diffusers terms.

A CompVis LDM checkpoint stores its UNet as ``model.diffusion_model.*`` with the module layout of
``openaimodel.UNetModel``: numbered ``input_blocks`` / ``middle_block`` / ``output_blocks``, each a
list of ``ResBlock``, ``AttentionBlock`` or ``SpatialTransformer``, ``Downsample`` and ``Upsample``
layers. This module describes that layout from the checkpoint's ``unet_config.params`` and maps it
onto diffusers' ``UNet2DModel`` (self-attention LDMs: LSUN, CelebA-HQ) module by module:

* :func:`module_map` lists ``(compvis_prefix, diffusers_prefix, kind)`` for every module;
* :func:`unet2d_config` is the ``UNet2DModel`` config of the same network;
* :func:`convert_unet2d_state_dict` renames and reshapes the weights (the fused ``qkv`` 1-D
  convolution of an ``AttentionBlock`` becomes ``to_q``/``to_k``/``to_v``; CompVis interleaves
  q, k, v per head: rows ``[head, (q|k|v), channel]``).

diffusers' ``UNet2DModel`` gives every attention block the same head *width*; a CompVis UNet with
``num_heads`` set (and ``num_head_channels: -1``, e.g. LSUN-Church) has the same head *count*
everywhere instead. :func:`set_attention_heads` sets that count on a built model; converted folders
record it in ``diffquant.json`` (``unet_attention_heads``) for the ``ldm_compvis`` family.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

#: CompVis ResBlock sub-modules → diffusers ResnetBlock2D sub-modules.
RESBLOCK_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
#: CompVis AttentionBlock sub-modules → diffusers Attention (``qkv`` is split separately).
ATTENTION_NAMES = {"norm": "group_norm", "proj_out": "to_out.0"}
#: CompVis Downsample / Upsample convolutions → diffusers Downsample2D / Upsample2D.
DOWNSAMPLE_NAMES = {"op": "conv"}
UPSAMPLE_NAMES = {"conv": "conv"}


def _param(params: dict, key: str, default: Any) -> Any:
    value = params.get(key, default)
    return default if value is None else value


def level_has_attention(params: dict) -> list[bool]:
    """Whether each resolution level (downsampling factor 1, 2, 4, ...) has attention blocks."""
    return [2**level in list(params["attention_resolutions"]) for level in range(len(params["channel_mult"]))]


def attention_heads(params: dict, channels: int) -> int:
    """Heads of a CompVis attention block on ``channels`` channels (``num_head_channels`` wins)."""
    head_channels = _param(params, "num_head_channels", -1)
    return channels // head_channels if head_channels != -1 else int(params["num_heads"])


def module_map(params: dict) -> list[tuple[str, str, str]]:
    """``(compvis_prefix, diffusers_prefix, kind)`` of every module of the UNet described by
    ``params``; kind is ``resblock``, ``attention`` (AttentionBlock), ``transformer``
    (SpatialTransformer, same names in both), ``downsample``, ``upsample`` or ``plain``."""
    mult = list(params["channel_mult"])
    n_res = int(params["num_res_blocks"])
    attn = level_has_attention(params)
    attn_kind = "transformer" if params.get("use_spatial_transformer") else "attention"
    updown = "resblock" if params.get("resblock_updown") else None
    out: list[tuple[str, str, str]] = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
        ("input_blocks.0.0", "conv_in", "plain"),
    ]
    k = 1
    for level in range(len(mult)):
        for j in range(n_res):
            out.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", "resblock"))
            if attn[level]:
                out.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", attn_kind))
            k += 1
        if level < len(mult) - 1:
            out.append((f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", updown or "downsample"))
            k += 1
    out += [
        ("middle_block.0", "mid_block.resnets.0", "resblock"),
        ("middle_block.1", "mid_block.attentions.0", attn_kind),
        ("middle_block.2", "mid_block.resnets.1", "resblock"),
    ]
    k = 0
    for up, level in enumerate(reversed(range(len(mult)))):
        for j in range(n_res + 1):
            out.append((f"output_blocks.{k}.0", f"up_blocks.{up}.resnets.{j}", "resblock"))
            index = 1
            if attn[level]:
                out.append((f"output_blocks.{k}.1", f"up_blocks.{up}.attentions.{j}", attn_kind))
                index = 2
            if j == n_res and level > 0:
                out.append(
                    (f"output_blocks.{k}.{index}", f"up_blocks.{up}.upsamplers.0", updown or "upsample")
                )
            k += 1
    out += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return out


def unet2d_config(params: dict, sample_size: int | None = None) -> dict[str, Any]:
    """The ``UNet2DModel`` config of the (self-attention) CompVis UNet described by ``params``."""
    mult = list(params["channel_mult"])
    channels = [int(params["model_channels"]) * m for m in mult]
    attn = level_has_attention(params)
    updown = bool(params.get("resblock_updown"))
    last = len(mult) - 1
    down = [
        "AttnDownBlock2D"
        if attn[lv]
        else ("ResnetDownsampleBlock2D" if updown and lv < last else "DownBlock2D")
        for lv in range(len(mult))
    ]
    up = [
        "AttnUpBlock2D" if attn[lv] else ("ResnetUpsampleBlock2D" if updown and lv > 0 else "UpBlock2D")
        for lv in reversed(range(len(mult)))
    ]
    head_channels = _param(params, "num_head_channels", -1)
    return {
        "sample_size": sample_size or params.get("image_size"),
        "in_channels": params["in_channels"],
        "out_channels": params["out_channels"],
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": params["num_res_blocks"],
        "attention_head_dim": None if head_channels == -1 else head_channels,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if params.get("use_scale_shift_norm") else "default",
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def fixed_head_count(params: dict) -> int | None:
    """The head count to set with :func:`set_attention_heads`, or None when heads have a fixed width."""
    return None if _param(params, "num_head_channels", -1) != -1 else int(params["num_heads"])


def split_qkv(weight: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """CompVis' fused ``qkv`` weight ``(3C, C_in[, 1])`` or bias ``(3C,)``, rows ordered
    ``[head, (q|k|v), channel]``, → q, k, v weights ``(C, C_in)`` or biases ``(C,)``."""
    rows = weight.shape[0]
    tail = weight.shape[1:2]  # (C_in,) for weights, () for biases
    w = weight.reshape(heads, 3, rows // (3 * heads), *tail)
    return tuple(w[:, i].reshape(rows // 3, *tail).contiguous() for i in range(3))  # type: ignore[return-value]


def _renamed(suffix: str, names: dict[str, str]) -> str:
    for old in sorted(names, key=len, reverse=True):
        if suffix == old or suffix.startswith(old + "."):
            return names[old] + suffix[len(old) :]
    raise KeyError(suffix)


def _module_params(state: dict[str, Tensor], prefix: str) -> Iterator[str]:
    return (k for k in list(state) if k.startswith(prefix + "."))


def convert_unet2d_state_dict(compvis: dict[str, Tensor], params: dict) -> dict[str, Tensor]:
    """CompVis UNet weights (keys without the ``model.diffusion_model.`` prefix) → ``UNet2DModel``
    weights; fails naming any checkpoint key the layout of ``params`` does not account for."""
    remaining = dict(compvis)
    out: dict[str, Tensor] = {}
    for cv_prefix, df_prefix, kind in module_map(params):
        for key in _module_params(remaining, cv_prefix):
            suffix = key[len(cv_prefix) + 1 :]
            value = remaining.pop(key)
            if kind == "attention" and suffix.startswith("qkv."):
                channels = value.shape[0] // 3
                parts = split_qkv(value, attention_heads(params, channels))
                for name, part in zip(("to_q", "to_k", "to_v"), parts):
                    out[f"{df_prefix}.{name}.{suffix[4:]}"] = part
                continue
            names = {
                "resblock": RESBLOCK_NAMES,
                "attention": ATTENTION_NAMES,
                "downsample": DOWNSAMPLE_NAMES,
                "upsample": UPSAMPLE_NAMES,
            }.get(kind)
            new_suffix = suffix if names is None else _renamed(suffix, names)
            if kind == "attention" and value.ndim == 3:  # Conv1d(C, C, 1) → Linear
                value = value[:, :, 0]
            out[f"{df_prefix}.{new_suffix}"] = value
    if remaining:
        raise KeyError(
            f"{len(remaining)} UNet weights do not fit the configured layout, e.g. "
            f"{sorted(remaining)[:5]}; check the original config (unet_config.params)."
        )
    return out


def set_attention_heads(unet: nn.Module, heads: int) -> nn.Module:
    """Give every attention block of a ``UNet2DModel`` ``heads`` heads of width ``channels / heads``
    (CompVis ``num_heads`` semantics); the projections are unchanged."""
    from diffusers.models.attention_processor import Attention

    for module in unet.modules():
        if isinstance(module, Attention):
            if module.inner_dim % heads:
                raise ValueError(f"{module.inner_dim} attention channels do not split into {heads} heads.")
            module.heads = heads
            module.sliceable_head_dim = heads
            module.scale = (module.inner_dim // heads) ** -0.5 if module.scale_qk else 1.0
    return unet


@torch.no_grad()
def count_attention_heads(unet: nn.Module) -> list[int]:
    """The head count of every attention block, in module order (for checks and logs)."""
    from diffusers.models.attention_processor import Attention

    return [m.heads for m in unet.modules() if isinstance(m, Attention)]
