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
The probabilities are formed one block of queries at a time (:data:`ATTENTION_BLOCK_ELEMENTS`
scores per batch row and block): a fraction of the memory and, at paper size, several times
faster than all queries at once (their scores leave the cache).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffquant.quant.quantizers import ActQuantizer

#: attention scores per batch row in one block of queries (4 MB of FP32 per row): the block stays
#: in cache, and memory no longer grows with L_q · L_k (SD at 512 px, all queries at once: 0.5 GB
#: per row and tensor)
ATTENTION_BLOCK_ELEMENTS = 1 << 20

#: with gradients, a call whose probabilities would take more than this many bytes keeps only each
#: query block's inputs for the backward pass and forms the block's probabilities again there
#: (``torch.utils.checkpoint``): the same values and gradients, the memory of one block instead
#: of every block's (a Bedroom 32×32 attention at batch 32: 1.8 GB per saved tensor)
CHECKPOINT_PROBS_BYTES = 1 << 30


@runtime_checkable
class BlockWatcher(Protocol):
    """A forward pre-hook of the probabilities' quantizer that watches whole calls and can be
    given a call block by block (QuEST's range initialisation,
    :class:`diffquant.methods.quest_init._GroupRanges`). Without it, such a hook makes the
    processor form all queries at once."""

    def __call__(self, q: ActQuantizer, args: tuple) -> None: ...

    def observe_blocks(self, q: ActQuantizer, blocks: Callable[[], Iterator[Tensor]], axis: int) -> None:
        """Watch one call of ``q`` given as blocks along ``axis`` (neither the batch nor the
        channel axis): ``blocks()`` forms them again at each call; watch it as the whole call."""

    def observed(self) -> contextlib.AbstractContextManager:
        """Within it, the hook ignores ``q``'s calls (the blocks of a call already watched)."""


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
        """Explicit attention on ``(B, heads, L, d)`` operands: returns ``(B, heads, L_q, d)``.

        The probabilities are formed one block of queries at a time (:meth:`_query_block_rows`):
        each output row depends on its own query row only, so this is the same attention, with
        the scores of one block in memory instead of all ``L_q · L_k`` (with and without gradients
        alike: training and sampling compute the same values). While the probabilities' quantizer
        observes ranges, the blocks are formed twice: once for it to observe the whole call
        (:meth:`ActQuantizer.observe_blocks`), once for the output. Its forward pre-hooks (code
        watching whole calls) are :class:`BlockWatcher` s here: each is given the call's blocks
        (formed again for each), then ignores the blocks' calls of the output.
        """
        query = self._quant_heads(query, self.q_quantizer)
        key = self._quant_heads(key, self.k_quantizer)
        value = self._quant_heads(value, self.v_quantizer)
        # one copy of each operand in the (B, heads, L, d) layout (CompVis' (B·heads, L, d)), not
        # one inside every matmul of a block
        query, value = query.contiguous(), value.contiguous()
        key_t = key.contiguous().transpose(-1, -2)
        rows = self._query_block_rows(query, key)
        pq = self.prob_quantizer
        if rows >= query.shape[2]:
            return self._block_output(attn, query, key_t, value, attention_mask, pq)
        b, h, l_q, _ = query.shape
        per_query_mask = attention_mask is not None and attention_mask.shape[-2] == l_q
        blocks = [
            (slice(i, i + rows), attention_mask[..., i : i + rows, :] if per_query_mask else attention_mask)
            for i in range(0, l_q, rows)
        ]
        out = query.new_empty(b, h, l_q, value.shape[-1])
        probs_bytes = b * h * l_q * key_t.shape[-1] * query.element_size()
        recompute = torch.is_grad_enabled() and probs_bytes > CHECKPOINT_PROBS_BYTES
        quantize = pq
        with contextlib.ExitStack() as watched:
            if pq is not None and (pq.observing or pq._forward_pre_hooks):

                def probs_blocks() -> Iterator[Tensor]:
                    return (self._probs(attn, query[:, :, s], key_t, mask) for s, mask in blocks)

                with torch.no_grad():
                    if pq.observing:
                        pq.observe_blocks(probs_blocks())
                        quantize = pq.forward_observed
                    for watcher in pq._forward_pre_hooks.values():  # BlockWatchers (_query_block_rows)
                        watcher.observe_blocks(pq, probs_blocks, axis=2)
                        # the call is watched: the blocks' calls below only quantize
                        watched.enter_context(watcher.observed())
            for s, mask in blocks:
                args = (attn, query[:, :, s], key_t, value, mask, quantize)
                out[:, :, s] = (
                    checkpoint(self._block_output, *args, use_reentrant=False)
                    if recompute
                    else self._block_output(*args)
                )
        return out

    def _block_output(
        self,
        attn: nn.Module,
        query: Tensor,
        key_t: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        quantize: Optional[Callable[[Tensor], Tensor]],
    ) -> Tensor:
        """One query block's output ``(B, heads, l, d_v)``: its probabilities (:meth:`_probs`) through
        ``quantize`` (None: unquantized), times ``value``."""
        probs = self._probs(attn, query, key_t, attention_mask)
        return torch.matmul(probs if quantize is None else quantize(probs), value)

    @staticmethod
    def _probs(attn: nn.Module, query: Tensor, key_t: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        """``softmax(q·kᵀ · scale + mask)`` ``(B, heads, l, L_k)`` for ``query`` ``(B, heads, l, d)``
        and ``key_t`` ``(B, heads, d, L_k)``, in ``query``'s dtype."""
        scores = torch.matmul(query, key_t) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        return scores.float().softmax(dim=-1).to(query.dtype)

    def _query_block_rows(self, query: Tensor, key: Tensor) -> int:
        """Queries per block: as many as keep one batch row's block of scores within
        :data:`ATTENTION_BLOCK_ELEMENTS` (at least one; independent of the batch size, so a sample's
        bits do not depend on the rows it is computed with); all of them while the probabilities'
        quantizer drops activations (QDrop: one random mask per call) or has a forward pre-hook
        that is not a :class:`BlockWatcher` (code watching whole calls)."""
        pq = self.prob_quantizer
        if pq is not None and (
            pq.keep_prob is not None
            or not all(isinstance(h, BlockWatcher) for h in pq._forward_pre_hooks.values())
        ):
            return query.shape[2]
        return max(1, ATTENTION_BLOCK_ELEMENTS // max(1, query.shape[1] * key.shape[2]))


def is_quant_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers ``Attention`` running a :class:`QuantAttnProcessor`."""
    return isinstance(getattr(module, "processor", None), QuantAttnProcessor)
