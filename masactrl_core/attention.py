"""Mutual self-attention as diffusers attention processors.

Each processor owns one transformer block's self-attention (``attn1``) and knows that block's index
in execution order. The denoising loop tells the shared :class:`MutualAttentionState` which step it
is on and how the rows of the current UNet batch map to source images; the processors never count
calls to guess either.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

_SECTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
_SELF_ATTENTION = re.compile(r"^(down_blocks|mid_block|up_blocks)\.(.*)\.attn1\.processor$")


def self_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Processor names of the transformer blocks' self-attention, in execution order.

    ``unet.attn_processors`` lists down, up, then mid blocks; the UNet runs down, mid, up, so the
    names are sorted by section and then by every numeric index along the path.
    """
    names = [name for name in unet.attn_processors if _SELF_ATTENTION.match(name)]

    def execution_key(name: str) -> tuple:
        section, path = _SELF_ATTENTION.match(name).groups()
        return (_SECTION_ORDER[section], *(int(part) for part in path.split(".") if part.isdigit()))

    return sorted(names, key=execution_key)


@dataclass
class BatchLayout:
    """How the rows of one UNet call relate to the source images.

    ``source_rows`` are the rows of this call that hold source images (one per guidance half, or a
    single row serving both); ``None`` when the sources ran in an earlier chunk of the same step.
    ``row_slots[r]`` is the source slot whose keys and values row ``r`` reads; a source row reads
    its own slot, so the source branch is plain self-attention.
    """

    source_rows: torch.Tensor | None
    row_slots: torch.Tensor
    keep_sources: bool = False


@dataclass
class MutualAttentionState:
    """Shared by the processors of one run; written by the denoising loop."""

    controlled_steps: frozenset[int]
    controlled_layers: frozenset[int]
    step: int | None = None
    layout: BatchLayout | None = None
    _source_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def begin_step(self, step: int | None) -> None:
        """Start denoising step ``step`` (``None`` outside the controlled loop, e.g. inversion)."""
        self.step = step
        self._source_kv.clear()

    def controls(self, layer: int) -> bool:
        return (
            self.step is not None
            and self.layout is not None
            and self.step in self.controlled_steps
            and layer in self.controlled_layers
        )

    def source_key_value(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values each row attends to: its source image's, in its guidance half."""
        layout = self.layout
        if layout.source_rows is not None:
            source_key, source_value = key[layout.source_rows], value[layout.source_rows]
            if layout.keep_sources:
                # Later chunks of this step hold only targets; they read these.
                self._source_kv[layer] = (source_key, source_value)
        else:
            source_key, source_value = self._source_kv[layer]
        return source_key[layout.row_slots], source_value[layout.row_slots]


class MutualSelfAttentionProcessor:
    """``AttnProcessor2_0`` whose keys and values come from the source image when controlled."""

    def __init__(self, layer: int, state: MutualAttentionState) -> None:
        self.layer = layer
        self.state = state

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """(batch, heads, tokens, dim) attention; SDPA never materializes the attention matrix."""
        return F.scaled_dot_product_attention(query, key, value)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("mutual self-attention is installed on a non-self-attention layer")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            tensor.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            for tensor in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.state.controls(self.layer):
            key, value = self.state.source_key_value(self.layer, key, value)
        hidden_states = self.attend(query, key, value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_processors(
    unet: torch.nn.Module,
    layer_names: list[str],
    state: MutualAttentionState,
    processor_class: type[MutualSelfAttentionProcessor] = MutualSelfAttentionProcessor,
    layers: Iterable[int] | None = None,
) -> dict[str, object]:
    """Install mutual self-attention on ``layers`` (all by default); return the old processors."""
    original = dict(unet.attn_processors)
    wanted = set(range(len(layer_names)) if layers is None else layers)
    replacement = dict(original)
    for index, name in enumerate(layer_names):
        if index in wanted:
            replacement[name] = processor_class(index, state)
    unet.set_attn_processor(replacement)
    return original
