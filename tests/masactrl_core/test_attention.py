"""Block numbering on the real SD1.5 and SDXL UNet configs, built on the meta device."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from masactrl_core.attention import self_attention_layers

SD15_UNET = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
)
SDXL_UNET = dict(
    sample_size=128,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def section_counts(names: list[str]) -> list[str]:
    return [name.split(".")[0] for name in names]


def test_sd15_has_16_blocks_numbered_down_mid_up():
    names = self_attention_layers(meta_unet(SD15_UNET))
    assert len(names) == 16
    assert section_counts(names) == ["down_blocks"] * 6 + ["mid_block"] + ["up_blocks"] * 9
    assert names[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    assert names[6] == "mid_block.attentions.0.transformer_blocks.0.attn1.processor"
    # The paper's start_layer 10 is the second cross-attention block of the decoder.
    assert names[10] == "up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor"
    assert names[15] == "up_blocks.3.attentions.2.transformer_blocks.0.attn1.processor"


def test_sdxl_has_70_blocks_numbered_down_mid_up():
    names = self_attention_layers(meta_unet(SDXL_UNET))
    assert len(names) == 70
    assert section_counts(names) == ["down_blocks"] * 24 + ["mid_block"] * 10 + ["up_blocks"] * 36
    assert names[4] == "down_blocks.2.attentions.0.transformer_blocks.0.attn1.processor"
    assert names[13] == "down_blocks.2.attentions.0.transformer_blocks.9.attn1.processor"
    assert names[44] == "up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor"


def test_order_differs_from_attn_processors_listing():
    unet = meta_unet(SD15_UNET)
    listed = [n for n in unet.attn_processors if n.endswith("attn1.processor")]
    assert listed != self_attention_layers(unet), "diffusers lists up blocks before the mid block"


@pytest.mark.parametrize("numbering", [SD15_UNET])
def test_indices_sort_numerically_not_lexically(numbering):
    names = self_attention_layers(meta_unet(SDXL_UNET))
    # transformer_blocks.10 would sort before .2 as text; SDXL's mid block has ten of them.
    mid = [n for n in names if n.startswith("mid_block")]
    assert [int(n.split(".")[4]) for n in mid] == list(range(10))


def test_block_levels_follow_the_samplers_of_each_topology():
    from masactrl_core.attention import block_levels

    sd = meta_unet(SD15_UNET)
    levels = block_levels(sd, self_attention_layers(sd))
    assert levels == [0, 0, 1, 1, 2, 2, 3] + [2] * 3 + [1] * 3 + [0] * 3
    xl = meta_unet(SDXL_UNET)
    # SDXL: down_blocks.1 (4 blocks) at 1/2, down_blocks.2 + mid + up_blocks.0 (60) at 1/4,
    # up_blocks.1 (6) at 1/2; at 1024 px the 1/4 level is the 32x32 grid of automatic masks.
    assert block_levels(xl, self_attention_layers(xl)) == [1] * 4 + [2] * 60 + [1] * 6
