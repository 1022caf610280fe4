"""Tiny seeded checkpoints of the multimodal diffusion transformers: FLUX.1 and SD3.

Same recipe as :mod:`masactrl_core.tiny` (seeded random components from configs, tokenizers
written by this module, saved in diffusers' folder format, loaded by exactly the code real
checkpoints go through), with these families' parts:

* **FLUX** (``FluxPipeline``): a CLIP text encoder (pooled embedding) and a T5 encoder, a
  ``FluxTransformer2DModel`` with 2 double-stream and 2 single-stream blocks and a guidance
  embedding (a [dev]-like, guidance-distilled model), a 16-channel ``AutoencoderKL`` with
  FLUX's scaling and shift factors, and FLUX.1-dev's scheduler config (dynamic shift).
* **SD3** (``StableDiffusion3Pipeline``): two CLIP encoders with projections (L and G) and a T5
  encoder, an ``SD3Transformer2DModel`` with 3 joint blocks, the 16-channel VAE, and SD3's
  static-shift scheduler config.

The T5 tokenizer is a Unigram model over the same words as the CLIP tokenizers' merge corpus
(``transformers.T5Tokenizer`` built from a vocabulary list, saved as ``tokenizer.json``), with
single letters as a fallback, so any lower-case prompt tokenizes. Output layers that the
transformers' own training code initialises at zero are random here anyway (PyTorch's default
initialisation). At these tiny widths that default leaves the text and the attention almost
without effect on the output (measured on the FLUX model, 4 steps at 64 px: changing the prompt
moved the latents by 0.012 of their 0.93 mean magnitude, mutual attention on every block by
0.0008), so every ``Linear`` weight of the transformer is scaled by a gain (:data:`GAINS`: 3 for
FLUX, where the prompt then moves the latents by 1.9, the control by 0.9, the images by 11/255 on
average; 1.5 for SD3, whose three joint blocks diverge at 2: latents of mean magnitude 7 where
float rounding grows to 4e-5): the tests need every block, prompt and control setting to show.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path
from typing import Any

from masactrl_core.tiny import (
    _MERGE_CORPUS,
    BOS_TOKEN,
    EOS_TOKEN,
    SD_TINY_TEXT_CONFIG,
    TinyCheckpointInfo,
    write_tokenizer,
)

__all__ = [
    "FLUX_SCHEDULER_CONFIG",
    "FLUX_TINY_TRANSFORMER_CONFIG",
    "MMDIT_FAMILIES",
    "SD3_SCHEDULER_CONFIG",
    "SD3_TINY_TRANSFORMER_CONFIG",
    "build_flux_pipeline",
    "build_sd3_pipeline",
    "mmdit_checkpoint_info",
    "write_t5_tokenizer",
    "write_tiny_mmdit_checkpoint",
]

MMDIT_FAMILIES = ("sd3", "flux")

# The T5 tokenizer's declared length: real checkpoints declare 512; the tiny one 32, which the
# engine takes as its max_sequence_length (text tokens per row), so tests stay fast.
T5_TINY_MAX_LENGTH = 32
_T5_WIDTH = 32
# The scale of the transformers' Linear weights over PyTorch's default (see the module docstring).
GAINS = {"flux": 3.0, "sd3": 1.5}
_CLIP_WIDTH = 32

# black-forest-labs/FLUX.1-dev's scheduler_config.json.
FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# stabilityai/stable-diffusion-3-medium-diffusers' scheduler_config.json.
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

# FLUX's block structure at tiny width: 2 double-stream blocks then 2 single-stream blocks.
FLUX_TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels packed 2x2
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": _T5_WIDTH,
    "pooled_projection_dim": _CLIP_WIDTH,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),  # sums to the head dim, as FLUX's (16, 56, 56) sums to 128
}

SD3_TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": _T5_WIDTH,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 2 * _CLIP_WIDTH,
    "pos_embed_max_size": 64,
}

# A 16-channel VAE with FLUX's scaling and shift (SD3's are 1.5305 and 0.0609).
_TINY_VAE_16: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
FLUX_TINY_VAE_CONFIG = {**_TINY_VAE_16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_TINY_VAE_CONFIG = {**_TINY_VAE_16, "scaling_factor": 1.5305, "shift_factor": 0.0609}

_T5_TINY_CONFIG: dict[str, Any] = {
    "d_model": _T5_WIDTH,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "dropout_rate": 0.0,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


def write_t5_tokenizer(folder: Path, *, words: list[str] | None = None) -> int:
    """Write a T5 (Unigram) tokenizer for ``words`` plus single letters; return its size.

    The layout is T5's: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then pieces; whole words score
    higher than letters, so a known word is one token.
    """
    from transformers import T5Tokenizer

    corpus = _MERGE_CORPUS.split() if words is None else words
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {piece for piece, _ in pieces}
    for word in dict.fromkeys(corpus):
        if f"▁{word}" not in seen:
            pieces.append((f"▁{word}", -1.0))
            seen.add(f"▁{word}")
    for letter in string.ascii_lowercase + string.digits + string.punctuation:
        for piece in (letter, f"▁{letter}"):
            if piece not in seen:
                pieces.append((piece, -8.0))
                seen.add(piece)
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_TINY_MAX_LENGTH)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return len(pieces)


def _clip_parts(folder: Path, name: str, seed: int, projection: bool, pad_token: str) -> Any:
    """A written CLIP tokenizer and a seeded tiny CLIP text encoder (with projection or not)."""
    import torch
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    vocab_size = write_tokenizer(folder / name, pad_token=pad_token)
    tokenizer = CLIPTokenizer.from_pretrained(folder / name)
    bos_id, eos_id = tokenizer.convert_tokens_to_ids([BOS_TOKEN, EOS_TOKEN])
    config = CLIPTextConfig(
        **{**SD_TINY_TEXT_CONFIG, "hidden_size": _CLIP_WIDTH, "projection_dim": _CLIP_WIDTH},
        vocab_size=vocab_size,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.convert_tokens_to_ids(pad_token),
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return tokenizer, model


def _amplify(transformer: Any, gain: float) -> Any:
    """Scale every Linear weight of ``transformer`` by ``gain``, in place."""
    import torch

    with torch.no_grad():
        for module in transformer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(gain)
    return transformer


def _t5_parts(folder: Path, name: str, seed: int) -> Any:
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab_size = write_t5_tokenizer(folder / name)
    tokenizer = T5Tokenizer.from_pretrained(folder / name)
    torch.manual_seed(seed)
    return tokenizer, T5EncoderModel(T5Config(vocab_size=vocab_size, **_T5_TINY_CONFIG))


def build_flux_pipeline(seed: int = 0, *, transformer_config: dict[str, Any] | None = None) -> Any:
    """Seeded random-weight FluxPipeline, in memory, with locally written tokenizers."""
    with tempfile.TemporaryDirectory(prefix="masactrl-tok-") as tmp:
        return _build_flux_pipeline(seed, Path(tmp), transformer_config)


def _build_flux_pipeline(
    seed: int, folder: Path, transformer_config: dict[str, Any] | None = None
) -> Any:
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
    )

    tokenizer, text_encoder = _clip_parts(folder, "tokenizer", seed, False, EOS_TOKEN)
    tokenizer_2, text_encoder_2 = _t5_parts(folder, "tokenizer_2", seed + 1)
    torch.manual_seed(seed)
    transformer = _amplify(
        FluxTransformer2DModel(**(transformer_config or FLUX_TINY_TRANSFORMER_CONFIG)),
        GAINS["flux"],
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(**FLUX_TINY_VAE_CONFIG)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_sd3_pipeline(seed: int = 0, *, transformer_config: dict[str, Any] | None = None) -> Any:
    """Seeded random-weight StableDiffusion3Pipeline, in memory, with local tokenizers."""
    with tempfile.TemporaryDirectory(prefix="masactrl-tok-") as tmp:
        return _build_sd3_pipeline(seed, Path(tmp), transformer_config)


def _build_sd3_pipeline(
    seed: int, folder: Path, transformer_config: dict[str, Any] | None = None
) -> Any:
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        StableDiffusion3Pipeline,
    )
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
    )

    tokenizer, text_encoder = _clip_parts(folder, "tokenizer", seed, True, EOS_TOKEN)
    tokenizer_2, text_encoder_2 = _clip_parts(folder, "tokenizer_2", seed + 1, True, "!")
    tokenizer_3, text_encoder_3 = _t5_parts(folder, "tokenizer_3", seed + 2)
    torch.manual_seed(seed)
    transformer = _amplify(
        SD3Transformer2DModel(**(transformer_config or SD3_TINY_TRANSFORMER_CONFIG)),
        GAINS["sd3"],
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(**SD3_TINY_VAE_CONFIG)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


# Latent cells per side a pipeline defaults to when its transformer declares none (FluxPipeline).
_PIPELINE_SAMPLE_SIZE = {"flux": 128}

_BUILDERS = {"flux": _build_flux_pipeline, "sd3": _build_sd3_pipeline}
_CLIP_TOKENIZERS = {"flux": ("tokenizer",), "sd3": ("tokenizer", "tokenizer_2")}


def write_tiny_mmdit_checkpoint(out_dir: str | Path, *, seed: int = 0, family: str) -> Path:
    """Write a seeded tiny ``flux`` or ``sd3`` checkpoint to ``out_dir``; same seed, same files."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown MM-DiT family {family!r}; expected one of sd3, flux")
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="masactrl-tok-") as tmp:
        pipe = _BUILDERS[family](seed, Path(tmp))
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(out, safe_serialization=True)
        # The CLIP tokenizers' files are this module's own, as in masactrl_core.tiny.
        for name in _CLIP_TOKENIZERS[family]:
            write_tokenizer(out / name, pad_token="!" if name == "tokenizer_2" else EOS_TOKEN)
    return out


def mmdit_checkpoint_info(out_dir: str | Path, *, seed: int = 0, family: str) -> TinyCheckpointInfo:
    """What the checkpoint in ``out_dir`` is; blocks counted on its transformer's config."""
    import json

    path = Path(out_dir)
    config = json.loads((path / "transformer" / "config.json").read_text(encoding="utf-8"))
    blocks = int(config["num_layers"]) + int(config.get("num_single_layers", 0))
    vae = json.loads((path / "vae" / "config.json").read_text(encoding="utf-8"))
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    # The pipelines' default size: FLUX's default_sample_size 128, SD3's transformer sample_size.
    native = _PIPELINE_SAMPLE_SIZE.get(family, int(config.get("sample_size", 0))) * factor
    return TinyCheckpointInfo(path, family, seed, native, factor, blocks)
