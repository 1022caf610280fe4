"""Mutual self-attention as diffusers attention processors.

Each processor owns one transformer block's self-attention (``attn1``) and knows that block's index
in execution order (the backbone's ``layer_names``, :mod:`masactrl_core.backbones`). The denoising
loop tells the shared :class:`MutualAttentionState` which step it is on and how the rows of the
current denoiser batch map to source images; the processors never count
calls to guess either. With masks (:mod:`masactrl_core.masks`) a target token reads only the
source tokens of its region; :class:`CrossAttentionMapProcessor` records the cross-attention maps
that automatic masks are made from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

# The UNet families' block numbering lives with their backbone; re-exported for its callers.
from masactrl_core.backbones.unet import (
    block_levels as block_levels,
)
from masactrl_core.backbones.unet import (
    cross_attention_name as cross_attention_name,
)
from masactrl_core.backbones.unet import (
    self_attention_layers as self_attention_layers,
)
from masactrl_core.masks import ManualMasks, RegionPlan, WordMasks, token_grid

if TYPE_CHECKING:
    from diffusers.models.attention_processor import AttentionProcessor


class AttentionHost(Protocol):
    """A denoiser whose attention processors can be listed and replaced (diffusers' mixin)."""

    @property
    def attn_processors(self) -> Mapping[str, Any]: ...

    def set_attn_processor(self, processor: Any) -> None: ...


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
    # The latent (0 = source, k = target k) each row denoises; needed only with masks.
    row_images: list[int] | None = None
    # Rows whose cross-attention maps automatic masks read (one conditional row per image).
    map_rows: torch.Tensor | None = None
    map_images: list[int] = field(default_factory=list)
    _image_rows: dict[int, torch.Tensor] | None = field(default=None, repr=False)

    def image_rows(self) -> dict[int, torch.Tensor]:
        """Rows of each image in this call (computed once per layout)."""
        if self._image_rows is None:
            rows: dict[int, list[int]] = {}
            for row, image in enumerate(self.row_images or []):
                rows.setdefault(image, []).append(row)
            device = self.row_slots.device
            self._image_rows = {image: torch.tensor(r, device=device) for image, r in rows.items()}
        return self._image_rows


@dataclass
class Routing:
    """Which rows of a controlled layer attend to all source tokens and which to regions."""

    plain_rows: torch.Tensor | None
    masked: list[tuple[torch.Tensor, RegionPlan]]


@dataclass
class MutualAttentionState:
    """Shared by the processors of one run; written by the denoising loop."""

    controlled_steps: frozenset[int]
    controlled_layers: frozenset[int]
    step: int | None = None
    layout: BatchLayout | None = None
    masks: ManualMasks | WordMasks | None = None
    latent_hw: tuple[int, int] | None = None
    # Image tokens per row in a transformer whose attention also holds text tokens (MM-DiT).
    image_tokens: int | None = None
    _source_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def begin_step(self, step: int | None) -> None:
        """Start denoising step ``step`` (``None`` outside the controlled loop, e.g. inversion)."""
        self.step = step
        self._source_kv.clear()
        if isinstance(self.masks, WordMasks):
            self.masks.begin_step()

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
        assert layout is not None  # controls() holds only while the loop has set a layout
        if layout.source_rows is not None:
            source_key, source_value = key[layout.source_rows], value[layout.source_rows]
            if layout.keep_sources:
                # Later chunks of this step hold only targets; they read these.
                self._source_kv[layer] = (source_key, source_value)
        else:
            source_key, source_value = self._source_kv[layer]
        return source_key[layout.row_slots], source_value[layout.row_slots]

    def routing(self, layer: int, tokens: int) -> Routing | None:
        """How a controlled layer's rows attend under the masks; ``None`` without masks."""
        masks, layout = self.masks, self.layout
        if masks is None:
            return None
        # The loop sets both before any controlled call of a run with masks.
        assert layout is not None and self.latent_hw is not None
        grid = token_grid(tokens, self.latent_hw)
        plain: list[torch.Tensor] = []
        masked: list[tuple[torch.Tensor, RegionPlan]] = []
        target_rows: list[torch.Tensor] = []
        for image, rows in layout.image_rows().items():
            if image == 0:  # the source branch is never restricted
                plain.append(rows)
            elif isinstance(masks, ManualMasks):
                target_rows.append(rows)
            else:
                plan = masks.plan(layer, grid, image)
                # No map yet in this step, or an empty source region: unmasked MasaCtrl.
                if plan is None:
                    plain.append(rows)
                else:
                    masked.append((rows, plan))
        if target_rows and isinstance(masks, ManualMasks):
            # Manual masks route every target alike (checked before sampling: never None).
            plan = masks.plan(grid)
            rows = torch.cat(target_rows)
            if plan is None:
                plain.append(rows)
            else:
                masked.append((rows, plan))
        if not masked:
            return None
        return Routing(torch.cat(plain) if plain else None, masked)

    def recording_rows(self) -> torch.Tensor | None:
        """Rows whose cross-attention maps automatic masks need now, if any."""
        if (
            not isinstance(self.masks, WordMasks)
            or self.step not in self.controlled_steps
            or self.layout is None
            or self.layout.map_rows is None
        ):
            return None
        return self.layout.map_rows

    def record_map(self, layer: int, probabilities: torch.Tensor) -> None:
        """(R, N, text tokens) head-averaged probabilities of the recording rows -> word maps."""
        layout, masks = self.layout, self.masks
        assert layout is not None and isinstance(masks, WordMasks)  # as recording_rows() checked
        images = layout.map_images
        weights = masks.token_weights[images].to(probabilities)
        masks.record(layer, images, torch.einsum("rnp,rp->rn", probabilities, weights))


class MutualSelfAttentionProcessor:
    """``AttnProcessor2_0`` whose keys and values come from the source image when controlled."""

    def __init__(self, layer: int, state: MutualAttentionState) -> None:
        self.layer = layer
        self.state = state

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """(batch, heads, tokens, dim) attention; SDPA never materializes the attention matrix."""
        return F.scaled_dot_product_attention(query, key, value)

    def attend_regions(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, routing: Routing
    ) -> torch.Tensor:
        """Mask-guided attention: each region's target queries over its source keys only.

        Restricting the keys by index selection is the boolean key mask without the masked
        columns: SDPA computes the same softmax over fewer keys and keeps its fastest kernels.
        Only the queries of a region are computed for it, so a full-foreground target mask runs
        no background attention at all.
        """
        out = torch.empty_like(query)
        if routing.plain_rows is not None:
            rows = routing.plain_rows
            out[rows] = self.attend(query[rows], key[rows], value[rows])
        for rows, plan in routing.masked:
            q, k, v = query[rows], key[rows], value[rows]
            part = torch.empty_like(q)
            for query_index, key_index in plan.groups:
                q_part = q if query_index is None else q[:, :, query_index]
                k_part = k if key_index is None else k[:, :, key_index]
                v_part = v if key_index is None else v[:, :, key_index]
                attended = self.attend(q_part, k_part, v_part)
                if query_index is None:
                    part = attended
                else:
                    part[:, :, query_index] = attended
            out[rows] = part
        return out

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

        routing = None
        if self.state.controls(self.layer):
            key, value = self.state.source_key_value(self.layer, key, value)
            routing = self.state.routing(self.layer, query.shape[2])
        if routing is None:
            hidden_states = self.attend(query, key, value)
        else:
            hidden_states = self.attend_regions(query, key, value, routing)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class CrossAttentionMapProcessor:
    """Cross-attention (attn2) that also records word maps for automatic masks.

    The output is diffusers' own ``AttnProcessor2_0``; the probabilities are computed explicitly
    only for the recording rows and only over the text tokens (77 keys), so no self-attention
    matrix is ever materialized.
    """

    def __init__(self, layer: int, state: MutualAttentionState) -> None:
        self.layer = layer
        self.state = state
        # diffusers leaves this __init__ unannotated.
        self.inner = AttnProcessor2_0()  # type: ignore[no-untyped-call]

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        output = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        rows = self.state.recording_rows()
        if rows is not None and encoder_hidden_states is not None:
            probabilities = self.probabilities(
                attn, hidden_states, encoder_hidden_states, attention_mask, rows
            )
            self.state.record_map(self.layer, probabilities)
        return output

    @staticmethod
    def probabilities(
        attn: Attention,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        attention_mask: torch.Tensor | None,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """Head-averaged softmax(Q K^T / sqrt(d)) over the text tokens, (R, N, text tokens)."""
        batch = hidden_states.shape[0]
        hidden, context = hidden_states[rows], context[rows]
        if attn.group_norm is not None:
            hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key = attn.to_q(hidden), attn.to_k(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(len(rows), -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(len(rows), -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # The scale SDPA uses by default (AttnProcessor2_0 passes none); float32 softmax.
        scores: torch.Tensor = (query.float() @ key.float().transpose(-1, -2)) * head_dim**-0.5
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1])[rows].float()
        return scores.softmax(dim=-1).mean(dim=1)


def install_processors(
    unet: AttentionHost,
    layer_names: list[str],
    state: MutualAttentionState,
    processor_class: type[MutualSelfAttentionProcessor] = MutualSelfAttentionProcessor,
    layers: Iterable[int] | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, AttentionProcessor]:
    """Install mutual self-attention on ``layers`` (all by default); return the old processors.

    ``unet`` is the backbone's denoiser (any model with diffusers' attention-processor mixin) and
    ``layer_names`` its controllable self-attention layers in execution order.

    ``extra`` maps further processor names (e.g. cross-attention map recorders) to processors.
    """
    original = dict(unet.attn_processors)
    wanted = set(range(len(layer_names)) if layers is None else layers)
    replacement: dict[str, object] = dict(original)
    for index, name in enumerate(layer_names):
        if index in wanted:
            replacement[name] = processor_class(index, state)
    replacement.update(extra or {})
    # diffusers calls any processor alike, whatever its class.
    unet.set_attn_processor(replacement)
    return original
