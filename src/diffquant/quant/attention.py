"""A quantizing attention processor for diffusers ``Attention``.

diffusers' default ``AttnProcessor2_0`` fuses q·kᵀ, softmax and ·v into one SDPA call, so the
matmul inputs are never visible. :class:`QuantAttnProcessor` computes them explicitly and
fake-quantizes the four matmul operands (as Q-Diffusion's ``QuantQKMatMul``/``QuantSMVMatMul``
and ``cross_attn_forward`` do):

    q, k, v   (B, L, inner)    at the activation bit-width (per tensor or per channel of inner)
    P = softmax(Q(q)·Q(k)ᵀ · scale)   (B, heads, L_q, L_k)   unsigned, zero point 0, own bit-width
    out = Q(P) · Q(v)

The projections ``to_q/to_k/to_v/to_out.0`` are ``QuantLinear`` layers (they quantize their own
inputs and weights); the processor only adds the matmul quantizers. It is an ``nn.Module``, so
``attn.set_processor(proc)`` registers its quantizers under ``<attn>.processor.*`` (state dict,
parameter listing). When all four quantizers are off (``quant_state(..., acts=False)``) or absent it
falls back to the fused SDPA kernel, so the FP teacher path costs what the FP model costs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffquant.quant.quantizers import ActQuantizer


class QuantAttnProcessor(nn.Module):
    """Attention with fake-quantized q, k, v and post-softmax probabilities.

    Any of the quantizers may be None (kept in full precision).
    """

    def __init__(
        self,
        q_quantizer: Optional[ActQuantizer],
        k_quantizer: Optional[ActQuantizer],
        v_quantizer: Optional[ActQuantizer],
        prob_quantizer: Optional[ActQuantizer],
    ) -> None:
        super().__init__()
        self.q_quantizer = q_quantizer
        self.k_quantizer = k_quantizer
        self.v_quantizer = v_quantizer
        self.prob_quantizer = prob_quantizer

    # ``Attention.forward`` filters keyword arguments by the processor's ``__call__`` signature.
    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        temb: Optional[Tensor] = None,
        **kwargs,
    ) -> Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _quantizers(self) -> list[ActQuantizer]:
        return [
            q
            for q in (self.q_quantizer, self.k_quantizer, self.v_quantizer, self.prob_quantizer)
            if q is not None
        ]

    def _active(self) -> bool:
        return any(q.enabled or q._observer is not None for q in self._quantizers())

    @staticmethod
    def _quant_heads(x: Tensor, quantizer: Optional[ActQuantizer]) -> Tensor:
        """Quantize ``(B, heads, L, d)`` in its ``(B, L, heads·d)`` layout (channels = inner dim)."""
        if quantizer is None:
            return x
        b, h, n, d = x.shape
        flat = quantizer(x.transpose(1, 2).reshape(b, n, h * d))
        return flat.view(b, n, h, d).transpose(1, 2)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        temb: Optional[Tensor] = None,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self._active():
            hidden_states = self._quantized_attention(attn, query, key, value, attention_mask)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _quantized_attention(
        self, attn: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor]
    ) -> Tensor:
        """Explicit attention on ``(B, heads, L, d)`` operands: returns ``(B, heads, L_q, d)``."""
        query = self._quant_heads(query, self.q_quantizer)
        key = self._quant_heads(key, self.k_quantizer)
        value = self._quant_heads(value, self.v_quantizer)
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.float().softmax(dim=-1).to(query.dtype)
        if self.prob_quantizer is not None:
            probs = self.prob_quantizer(probs)
        return torch.matmul(probs, value)


def is_quant_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers ``Attention`` running a :class:`QuantAttnProcessor`."""
    return isinstance(getattr(module, "processor", None), QuantAttnProcessor)
