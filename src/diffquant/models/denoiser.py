"""What a model family declares about its denoiser: how it is called and which layers play which
role.

Quantization, calibration, reconstruction and the methods never name a module of a denoiser.
They ask the model wrapper's :class:`DenoiserSpec` (``model.spec``), in the spirit of the
diffusers model classes that declare their special modules (``_keep_in_fp32_modules``,
``_skip_layerwise_casting_patterns``). A new family declares its own spec in ``models/`` and
every method works on it, or fails naming the role the family lacks: :class:`UNetSpec` (the UNet
families), :class:`DiTSpec` and :class:`PixArtSpec` (the ``dit`` and ``pixart`` transformers,
see :class:`TransformerSpec`).

Calling convention
------------------
The denoiser is called with keyword arguments only: the latents ``x_t`` under
:attr:`DenoiserSpec.sample_arg` ``(B, C, h, w)``, the time step under
:attr:`DenoiserSpec.timestep_arg` ``(B,)`` (one entry per row), and the family's condition tensors
(``class_labels`` ``(B,)``, ``encoder_hidden_states`` ``(B, L, D)``, ...), every tensor with the
batch dimension first. A calibration row is exactly one row of such a call.
:meth:`DenoiserSpec.forward` calls the denoiser on such a batch and returns its output tensor
``(B, C_out, h, w)``.

Roles
-----
Each role is a set of ``nn.Conv2d`` / ``nn.Linear`` layers (their qualified names), resolved on the
module (FP or quantized: quantized layers subclass the FP ones and keep their names):

===================== ==========================================================================
``first``             the layer that reads ``x_t`` (it gets ``quant.first_last_act_bits``)
``last``              the layer that writes the output (likewise)
``time_embedding``    the layers of the time-step embedding MLP (input: a function of t alone)
``time_projection``   the per-block projections of the time embedding (input: a function of t
                      alone; QuEST's TLA layers)
``self_attention_qkv`` q, k, v projections of self-attention
``cross_attention_q`` q projections of cross-attention (queries from the image tokens)
``cross_attention_kv`` k, v projections of cross-attention (from the condition)
``attention_out``     output projections of every attention
``feed_forward``      the layers of the transformer feed-forward networks
===================== ==========================================================================

A role the family has but this model instance lacks (no cross-attention in an unconditional
UNet) resolves to an empty list; :meth:`DenoiserSpec.require` turns an empty selection into an
error naming the family, for methods that need the layers. An unknown role name is always an
error.

Besides roles, a spec declares the reconstruction units (:meth:`DenoiserSpec.unit_kind`: blocks
reconstructed as one), the shortcut splits of skip concatenations, and the "layer type" of a
layer name (the name without its block path, for per-type reports).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import Tensor, nn

ROLES = (
    "first",
    "last",
    "time_embedding",
    "time_projection",
    "self_attention_qkv",
    "cross_attention_q",
    "cross_attention_kv",
    "attention_out",
    "feed_forward",
)


class RoleError(ValueError):
    """A role that is unknown, or that a method needs and the model lacks."""


def is_layer(module: nn.Module) -> bool:
    """Conv2d and Linear layers: what quantization swaps and what roles are made of."""
    return isinstance(module, (nn.Conv2d, nn.Linear))


class DenoiserSpec:
    """The base description; families subclass it (see :class:`DiffusersSpec`, :class:`UNetSpec`).

    Attributes:
        family: the model family's name (for messages).
        sample_arg / timestep_arg: keyword arguments carrying ``x_t`` ``(B, C, h, w)`` and the
            time step ``(B,)``.
        timestep_position: where the time step sits when a caller outside diffquant (a user's
            diffusers pipeline) passes it positionally; None: keyword only.
    """

    family: str = "base"
    sample_arg: str = "sample"
    timestep_arg: str = "timestep"
    timestep_position: Optional[int] = None

    # ------------------------------------------------------------------ calling
    def output(self, denoiser: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Everything the denoiser returns on keyword arguments ``batch``, ``(B, C_out, h, w)``
        (for a learned-sigma transformer: ε, then the variance interpolation)."""
        out = denoiser(**batch)
        if isinstance(out, Tensor):
            return out
        return out.sample if hasattr(out, "sample") else out[0]

    def forward(self, denoiser: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The denoiser's prediction ``(B, C_out, h, w)`` on keyword arguments ``batch``."""
        return self.output(denoiser, batch)

    def batch_size(self, batch: dict[str, Any]) -> int:
        """Rows of a denoiser call's keyword arguments."""
        return int(batch[self.sample_arg].shape[0])

    def timestep(self, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        """The time-step argument of a call (a forward pre-hook's ``args``/``kwargs``)."""
        if self.timestep_arg in kwargs:
            return kwargs[self.timestep_arg]
        if self.timestep_position is not None and len(args) > self.timestep_position:
            return args[self.timestep_position]
        raise RuntimeError(
            f"{self.family} denoiser called without its time step (keyword "
            f"argument {self.timestep_arg!r}): time-step-aware quantizers need it"
        )

    # ------------------------------------------------------------------ roles
    def resolve(self, denoiser: nn.Module) -> dict[str, list[str]]:
        """Every role → the qualified names of its layers, in module order."""
        raise NotImplementedError

    def layers(self, denoiser: nn.Module, *roles: str) -> list[str]:
        """The layers of ``roles`` (union, module order); unknown roles are an error."""
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise RoleError(f"unknown denoiser role(s) {unknown}; roles are {', '.join(ROLES)}")
        table = self.resolve(denoiser)
        wanted = {n for r in roles for n in table[r]}
        return [n for n, _ in denoiser.named_modules() if n in wanted]

    def require(self, denoiser: nn.Module, *roles: str, purpose: str = "") -> list[str]:
        """Like :meth:`layers`, but no layer in any of ``roles`` is an error naming the family
        and ``purpose`` (a method that needs them would otherwise silently train nothing)."""
        layers = self.layers(denoiser, *roles)
        if not layers:
            raise RoleError(
                f"{purpose or 'this method'} needs layers in the denoiser role(s) "
                f"{list(roles)}, which this {self.family} model has none of"
            )
        return layers

    # ------------------------------------------------------------------ structure
    def unit_kind(self, module: nn.Module) -> Optional[str]:
        """The reconstruction-unit kind of a block reconstructed as one (``resnet``,
        ``transformer``, ``attention``), or None (its layers are units on their own)."""
        return None

    def shortcut_splits(self, denoiser: nn.Module) -> dict[str, int]:
        """``{layer name: channels of the first part}`` for layers fed by a concatenation of two
        tensors of different ranges (quantized in two halves); ``{}`` if the family has none."""
        return {}

    def layer_type(self, name: str) -> str:
        """A layer's name without its block path and indices (the "activation type" of per-type
        reports)."""
        return re.sub(r"\.\d+(?=\.|$)", "", name)

    # ------------------------------------------------------------------ temporal block
    def temporal_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The entries of a denoiser call's keyword arguments the time-step embedding depends on
        (the time step ``(B,)``, and a class label ``(B,)`` where the family embeds it with the
        time step)."""
        keys = (self.timestep_arg, "class_labels")
        return {k: batch[k] for k in keys if k in batch and batch[k] is not None}

    def temporal_outputs(self, denoiser: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """TFMQ-DM's *temporal information block* run alone: the output ``(B, C_i)`` of every
        ``time_projection`` layer (by qualified name), computed from :meth:`temporal_inputs`
        only, through the ``time_embedding`` layers, exactly as the denoiser's forward computes
        them (:func:`check_temporal_outputs` compares the two)."""
        raise RoleError(
            f"the {self.family} family does not declare how its time-step embedding runs alone "
            "(DenoiserSpec.temporal_outputs), which TFMQ-DM's temporal reconstruction needs: set "
            "method.tiar=false"
        )


# ---------------------------------------------------------------------------- diffusers
class DiffusersSpec(DenoiserSpec):
    """Roles found from diffusers' building blocks, whatever the architecture around them:
    ``Attention`` (q/k/v/out, self or cross), ``FeedForward``, ``TimestepEmbedding``, and the
    ``time_emb_proj`` of ``ResnetBlock2D``. Families name their ``first`` / ``last`` layers."""

    first_layers: tuple[str, ...] = ()
    last_layers: tuple[str, ...] = ()
    timestep_position = 1  # diffusers denoisers: forward(sample / hidden_states, timestep, ...)

    def resolve(self, denoiser: nn.Module) -> dict[str, list[str]]:
        from diffusers.models.attention import FeedForward
        from diffusers.models.attention_processor import Attention
        from diffusers.models.embeddings import TimestepEmbedding
        from diffusers.models.resnet import ResnetBlock2D

        table: dict[str, list[str]] = {r: [] for r in ROLES}
        modules = dict(denoiser.named_modules())
        for role, names in (("first", self.first_layers), ("last", self.last_layers)):
            for n in names:
                if not is_layer(modules.get(n, nn.Identity())):
                    raise RoleError(
                        f"{self.family} denoiser: role {role!r} names layer {n!r}, "
                        "which is not a Conv2d/Linear of this model"
                    )
                table[role].append(n)

        def sub(prefix: str, attr: str) -> list[str]:
            name = f"{prefix}.{attr}" if prefix else attr
            return [name] if is_layer(modules.get(name, nn.Identity())) else []

        for name, m in modules.items():
            if isinstance(m, Attention):
                if m.is_cross_attention:
                    table["cross_attention_q"] += sub(name, "to_q")
                    table["cross_attention_kv"] += sub(name, "to_k") + sub(name, "to_v")
                else:
                    table["self_attention_qkv"] += sub(name, "to_q") + sub(name, "to_k") + sub(name, "to_v")
                table["attention_out"] += sub(name, "to_out.0")
            elif isinstance(m, FeedForward):
                table["feed_forward"] += [f"{name}.{n}" for n, c in m.named_modules() if n and is_layer(c)]
            elif isinstance(m, TimestepEmbedding):
                table["time_embedding"] += [f"{name}.{n}" for n, c in m.named_modules() if n and is_layer(c)]
            elif isinstance(m, ResnetBlock2D):
                table["time_projection"] += sub(name, "time_emb_proj")
        return table

    def unit_kind(self, module: nn.Module) -> Optional[str]:
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D

        for cls, kind in (
            (ResnetBlock2D, "resnet"),
            (BasicTransformerBlock, "transformer"),
            (Attention, "attention"),
        ):
            if isinstance(module, cls):
                return kind
        return None


class UNetSpec(DiffusersSpec):
    """diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (the ``ldm``, ``ldm_compvis``,
    ``ldm_class_context`` and ``sd`` families)."""

    family = "unet"
    first_layers = ("conv_in",)
    last_layers = ("conv_out",)

    def temporal_outputs(self, denoiser: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """``time_proj`` → ``time_embedding`` (+ the class embedding, where the UNet has one)
        → every ``ResnetBlock2D``'s ``nonlinearity`` → ``time_emb_proj`` (``UNet2DModel.forward``
        step 1 and ``ResnetBlock2D.forward`` in diffusers)."""
        from diffusers.models.resnet import ResnetBlock2D

        t = inputs[self.timestep_arg]
        labels = inputs.get("class_labels")
        config = denoiser.config
        if getattr(config, "addition_embed_type", None) is not None:
            raise RoleError(
                f"unet denoiser with addition_embed_type={config.addition_embed_type!r}: its time "
                "embedding also reads the condition, which temporal_outputs does not run"
            )
        t_emb = denoiser.time_proj(t).to(dtype=denoiser.dtype)
        cond_model = hasattr(denoiser, "get_class_embed")  # UNet2DConditionModel
        emb = denoiser.time_embedding(t_emb, None) if cond_model else denoiser.time_embedding(t_emb)
        if getattr(denoiser, "class_embedding", None) is not None:
            if labels is None:
                raise RoleError("class-conditional unet: temporal_outputs needs class_labels")
            if config.class_embed_type == "timestep":
                labels = denoiser.time_proj(labels)
            class_emb = denoiser.class_embedding(labels).to(dtype=emb.dtype)
            concat = getattr(config, "class_embeddings_concat", False)
            emb = torch.cat([emb, class_emb], dim=-1) if concat else emb + class_emb
        if getattr(denoiser, "time_embed_act", None) is not None:
            emb = denoiser.time_embed_act(emb)
        out: dict[str, Tensor] = {}
        for name, m in denoiser.named_modules():
            if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None:
                x = emb if m.skip_time_act else m.nonlinearity(emb)
                out[f"{name}.time_emb_proj"] = m.time_emb_proj(x)
        return out

    def shortcut_splits(self, denoiser: nn.Module) -> dict[str, int]:
        """The ``conv_shortcut`` of each up-block ``ResnetBlock2D`` fed by ``cat([h, skip])``.

        Resnet ``j`` of an up block receives ``cat([h, skip])``; ``h`` has the previous resnet's
        output channels (``j > 0``) or the channels entering the up block (``j = 0``: the
        previous up block's output, or the mid block's / last down block's for the first one).
        """
        splits: dict[str, int] = {}
        up_blocks = getattr(denoiser, "up_blocks", None)
        if up_blocks is None:
            return splits
        mid = getattr(denoiser, "mid_block", None)
        entering = _out_channels(mid) if mid is not None else None
        if entering is None and len(getattr(denoiser, "down_blocks", [])):
            entering = _out_channels(denoiser.down_blocks[-1])
        for k, block in enumerate(up_blocks):
            h_channels = entering
            for j, resnet in enumerate(getattr(block, "resnets", None) or []):
                shortcut = getattr(resnet, "conv_shortcut", None)
                if (
                    isinstance(shortcut, nn.Conv2d)
                    and h_channels is not None
                    and 0 < h_channels < shortcut.in_channels
                ):
                    splits[f"up_blocks.{k}.resnets.{j}.conv_shortcut"] = int(h_channels)
                h_channels = int(resnet.out_channels)
            entering = _out_channels(block) or entering
        return splits

    def layer_type(self, name: str) -> str:
        """``down_blocks.1.attentions.0.to_q`` → ``attentions.to_q``."""
        name = re.sub(r"^(down_blocks|up_blocks|mid_block)\.(\d+\.)?", "", name)
        return super().layer_type(name)


def _out_channels(block: nn.Module) -> Optional[int]:
    resnets = getattr(block, "resnets", None)
    if resnets is None or len(resnets) == 0:
        return None
    return int(resnets[-1].out_channels)


UNET = UNetSpec()


class TransformerSpec(DiffusersSpec):
    """diffusers latent diffusion transformers (``DiTTransformer2DModel``,
    ``PixArtTransformer2DModel``): latents ``(B, C, h, w)`` under ``hidden_states``, read by the
    patch embedding ``pos_embed.proj`` (a Conv2d: the ``first`` role); the
    ``BasicTransformerBlock`` s are the reconstruction units.

    ``time_projection``: the adaLN modulation linears that project the time-step embedding (DiT:
    plus the class embedding) into the blocks — the ``linear`` of every ``AdaLayerNormZero`` (one
    per DiT block) and ``AdaLayerNormSingle`` (PixArt's one, shared by all blocks) — and the
    family's :attr:`time_projection_layers` (DiT's final modulation ``proj_out_1``).
    ``time_embedding``: the ``TimestepEmbedding`` MLPs (found by :class:`DiffusersSpec`; DiT has
    one per block).

    Learned sigma: a denoiser with ``2C`` output channels for ``C`` latent channels (DiT-XL/2,
    PixArt-α: ε and the variance interpolation) returns ε only from :meth:`forward`
    ``(B, C, h, w)``, as diffusers' ``DiTPipeline`` and ``PixArtAlphaPipeline`` do; the sampler
    then uses its scheduler's own variance, unless ``model.learned_variance`` makes it read
    :meth:`output` (both halves) and step with the learned variance, as DiT's own sampler does.
    """

    family = "transformer"
    sample_arg = "hidden_states"
    first_layers = ("pos_embed.proj",)
    time_projection_layers: tuple[str, ...] = ()

    def forward(self, denoiser: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """ε ``(B, C, h, w)``: the first ``C`` output channels when the denoiser also predicts the
        variance (``2C`` channels for a ``C``-channel input)."""
        out = self.output(denoiser, batch)
        channels = batch[self.sample_arg].shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out

    def resolve(self, denoiser: nn.Module) -> dict[str, list[str]]:
        from diffusers.models.normalization import AdaLayerNormSingle, AdaLayerNormZero

        table = super().resolve(denoiser)
        modules = dict(denoiser.named_modules())
        projections = [
            f"{n}.linear"
            for n, m in modules.items()
            if isinstance(m, (AdaLayerNormZero, AdaLayerNormSingle)) and is_layer(modules.get(f"{n}.linear"))
        ]
        for n in self.time_projection_layers:
            if not is_layer(modules.get(n, nn.Identity())):
                raise RoleError(
                    f"{self.family} denoiser: role 'time_projection' names layer {n!r}, "
                    "which is not a Conv2d/Linear of this model"
                )
            projections.append(n)
        table["time_projection"] = projections
        return table

    def layer_type(self, name: str) -> str:
        """``transformer_blocks.3.attn1.to_q`` → ``attn1.to_q``."""
        return super().layer_type(re.sub(r"^transformer_blocks\.\d+\.", "", name))

    def temporal_outputs(self, denoiser: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every ``AdaLayerNormZero`` (DiT, one per block): ``linear(silu(emb(t, class_labels)))``;
        PixArt's shared ``AdaLayerNormSingle``: ``linear(silu(emb(t)))`` (without the resolution
        conditions PixArt-α 1024 adds); and the family's :attr:`time_projection_layers` (DiT's
        ``proj_out_1(silu(transformer_blocks[0].norm1.emb(t, class_labels)))``), as
        ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel.forward`` compute them."""
        from diffusers.models.normalization import AdaLayerNormSingle, AdaLayerNormZero

        t, labels = inputs[self.timestep_arg], inputs.get("class_labels")
        dtype = next(denoiser.parameters()).dtype
        out: dict[str, Tensor] = {}
        for name, m in denoiser.named_modules():
            if isinstance(m, AdaLayerNormZero) and m.emb is not None:
                out[f"{name}.linear"] = m.linear(m.silu(m.emb(t, labels, hidden_dtype=dtype)))
            elif isinstance(m, AdaLayerNormSingle):
                emb = m.emb(t, resolution=None, aspect_ratio=None, batch_size=t.shape[0], hidden_dtype=dtype)
                out[f"{name}.linear"] = m.linear(m.silu(emb))
        if "proj_out_1" in self.time_projection_layers:
            cond = denoiser.transformer_blocks[0].norm1.emb(t, labels, hidden_dtype=dtype)
            out["proj_out_1"] = denoiser.proj_out_1(torch.nn.functional.silu(cond))
        return out


class DiTSpec(TransformerSpec):
    """``DiTTransformer2DModel`` (family ``dit``): ``forward(hidden_states, timestep,
    class_labels)``; output written by ``proj_out_2``, whose modulation ``proj_out_1`` reads the
    time-step + class embedding."""

    family = "dit"
    last_layers = ("proj_out_2",)
    time_projection_layers = ("proj_out_1",)
    timestep_position = 1


class PixArtSpec(TransformerSpec):
    """``PixArtTransformer2DModel`` (family ``pixart``): ``forward(hidden_states,
    encoder_hidden_states, timestep, ...)`` with the T5 states ``(B, L, 4096)`` and their mask
    ``encoder_attention_mask`` ``(B, L)``; output written by ``proj_out``. The caption projection
    (``caption_projection.linear_1/2``) plays no role: it is quantized like any layer."""

    family = "pixart"
    last_layers = ("proj_out",)
    timestep_position = 2


DIT = DiTSpec()
PIXART = PixArtSpec()
