"""Mutual attention on multimodal diffusion transformers (FLUX.1's double- and single-stream
blocks, SD3's joint blocks), as diffusers attention processors.

In an MM-DiT, text and image tokens share one attention. The MasaCtrl rule there, in each
controlled block at each controlled step: every target row's attention uses its **own queries**
(text and image tokens) and **keys and values whose image-token part is the source row's**,
**whose text-token part is its own**, all after the block's own normalisation and rotary
positions, so the source's image keys are used exactly as the source computed them. The source
row and uncontrolled blocks and steps are the plain model. (In a UNet the text enters through a
cross-attention and the self-attention holds image tokens only: the same rule.)

**Masks** restrict which source image tokens each target *image* token reads (the same regions
as on UNets, on the transformer's token grid); every query still reads the row's own text keys,
and the target's text tokens read every key.

The processor is told everything by the sampler through the shared
:class:`~masactrl_core.attention.MutualAttentionState` (step, row layout, the number of image
tokens); the block index comes from the backbone's numbering (double-stream blocks ``0..D-1``,
then single-stream ``D..D+S-1``). The source rows' image keys and values are read with
:meth:`MutualAttentionState.source_key_value`, as on UNets, so chunked batches work alike.

Layout: FLUX concatenates ``[text, image]`` along the sequence; a double-stream block gets the
text as ``encoder_hidden_states``, a single-stream block gets the concatenation as
``hidden_states`` and no ``encoder_hidden_states`` (its text length is the total less the
image tokens the state names).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from masactrl_core.attention import MutualAttentionState, Routing

__all__ = [
    "FluxMutualAttentionProcessor",
    "JointMutualAttention",
    "SD3MutualAttentionProcessor",
    "joint_keys_values",
]


def joint_keys_values(
    state: MutualAttentionState,
    layer: int,
    key: torch.Tensor,
    value: torch.Tensor,
    text: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, T + N, d) keys and values of a controlled call: own text part, source image part.

    ``text`` is where the image tokens start (FLUX: text first).
    """
    source_key, source_value = state.source_key_value(layer, key[:, :, text:], value[:, :, text:])
    return (
        torch.cat([key[:, :, :text], source_key], dim=2),
        torch.cat([value[:, :, :text], source_value], dim=2),
    )


def attend_joint_regions(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    routing: Routing,
    text: int,
) -> torch.Tensor:
    """Masked joint attention: each region's target image queries over the text keys and the
    source image keys of that region; text queries over every key.

    Keys are selected by index (no boolean mask), so SDPA keeps its fast kernels.
    """
    out = torch.empty_like(query)
    if routing.plain_rows is not None:
        rows = routing.plain_rows
        out[rows] = F.scaled_dot_product_attention(query[rows], key[rows], value[rows])
    device = query.device
    text_index = torch.arange(text, device=device)
    for rows, plan in routing.masked:
        q, k, v = query[rows], key[rows], value[rows]
        part = torch.empty_like(q)
        part[:, :, :text] = F.scaled_dot_product_attention(q[:, :, :text], k, v)
        for query_index, key_index in plan.groups:
            queries = slice(text, None) if query_index is None else (query_index + text)
            keys = slice(None) if key_index is None else torch.cat([text_index, key_index + text])
            part[:, :, queries] = F.scaled_dot_product_attention(
                q[:, :, queries], k[:, :, keys], v[:, :, keys]
            )
        out[rows] = part
    return out


class JointMutualAttention:
    """What the MM-DiT processors share: the controlled joint attention on text-first tokens."""

    def __init__(self, layer: int, state: MutualAttentionState) -> None:
        self.layer = layer
        self.state = state

    def joint(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text: int
    ) -> torch.Tensor:
        """(B, H, T + N, d) attention of ``[text, image]`` tokens, under the rule if controlled."""
        state = self.state
        routing = None
        if state.controls(self.layer):
            key, value = joint_keys_values(state, self.layer, key, value, text)
            routing = state.routing(self.layer, query.shape[2] - text)
        return self.attend(query, key, value, routing, text)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        routing: Routing | None,
        text: int,
    ) -> torch.Tensor:
        """(B, H, L, d) joint attention; SDPA never materializes the attention matrix."""
        if routing is None:
            return F.scaled_dot_product_attention(query, key, value)
        return attend_joint_regions(query, key, value, routing, text)


class FluxMutualAttentionProcessor(JointMutualAttention):
    """``FluxAttnProcessor`` whose target rows read the source's image keys when controlled."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: object,
    ) -> Any:
        if attention_mask is not None:
            raise ValueError("mutual attention does not take an attention mask")
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = (
                attn.to_q(hidden_states),
                attn.to_k(hidden_states),
                attn.to_v(hidden_states),
            )
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        double = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if double:
            assert encoder_hidden_states is not None  # for mypy: ``double`` says so
            if attn.fused_projections:
                text_q, text_k, text_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                text_q = attn.add_q_proj(encoder_hidden_states)
                text_k = attn.add_k_proj(encoder_hidden_states)
                text_v = attn.add_v_proj(encoder_hidden_states)
            text_q, text_k, text_v = (
                t.unflatten(-1, (-1, attn.head_dim)) for t in (text_q, text_k, text_v)
            )
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_k, key], dim=1)
            value = torch.cat([text_v, value], dim=1)
        if image_rotary_emb is not None:
            # diffusers annotates the (cos, sin) pair it passes as a one-tuple.
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type]
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)  # type: ignore[arg-type]
        # (B, L, H, d) -> (B, H, L, d), the layout of the state's key cache and of SDPA.
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))

        tokens = query.shape[2]
        image_tokens = self.state.image_tokens if self.state.image_tokens is not None else tokens
        text = tokens - image_tokens
        hidden = self.joint(query, key, value, text)
        hidden = hidden.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if not double:
            return hidden
        assert encoder_hidden_states is not None
        text_out, image_out = hidden.split_with_sizes([text, image_tokens], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        text_out = attn.to_add_out(text_out.contiguous())
        return image_out, text_out


class SD3MutualAttentionProcessor(JointMutualAttention):
    """``JointAttnProcessor2_0`` (SD3's joint blocks) under the rule.

    SD3 concatenates ``[image, text]``; attention does not depend on the order of the keys, and
    the queries are split back by position, so the tokens are put text-first here to share
    :meth:`JointMutualAttention.joint` with FLUX. SD3 has no rotary positions (its positions are
    added to the patch embeddings).
    """

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> Any:
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("mutual attention is installed on a layer that is not a joint block")
        batch = hidden_states.shape[0]

        def heads(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.view(batch, -1, attn.heads, tensor.shape[-1] // attn.heads).transpose(
                1, 2
            )

        query = heads(attn.to_q(hidden_states))
        key = heads(attn.to_k(hidden_states))
        value = heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_q = heads(attn.add_q_proj(encoder_hidden_states))
        text_k = heads(attn.add_k_proj(encoder_hidden_states))
        text_v = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        text = text_q.shape[2]
        hidden = self.joint(
            torch.cat([text_q, query], dim=2),
            torch.cat([text_k, key], dim=2),
            torch.cat([text_v, value], dim=2),
            text,
        )
        hidden = hidden.transpose(1, 2).reshape(batch, -1, hidden.shape[1] * hidden.shape[3])
        hidden = hidden.to(query.dtype)
        text_out, image_out = hidden[:, :text], hidden[:, text:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        return image_out, text_out
