"""Small seeded random-weight checkpoints in diffusers' folder format, for offline tests and demos.

Family ``sd``: the UNet keeps the full SD1.x *topology* (4 down blocks, 2 layers each, 16
transformer blocks) so the paper's default control (start_layer=10 of 16) applies unchanged.
Real checkpoints are not all shaped like SD 1.5: pruned and distilled ones (BK-SDM, segmind's
small-sd/tiny-sd) have fewer levels, fewer layers or no mid block. ``SD_VARIANTS`` builds tiny
SD-family UNets of such shapes (``two-level``: 7 blocks; ``no-mid``: 9 blocks, no mid block, one
layer per level as BK-SDM; ``three-level``: 11 blocks), so everything that reads a model's shape
is tested on more than one copy of SD's numbering; ``SDXL_VARIANTS`` likewise (``shallow``:
17 blocks, as distilled SDXL models cut the transformer depth).
Family ``sdxl``: SDXL's topology (3 down blocks, transformer depths 1/2/10, 70 transformer blocks,
text_time added conditioning, two text encoders, the second with a projection) so its default
start_layer 44 of 70 applies unchanged. Only the widths are tiny; one SDXL UNet forward at the
native 64x64 px takes about 50 ms on one CPU core. Everything is built locally — the tokenizers'
vocab.json and merges.txt are written by this module — so nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FAMILIES",
    "TinyCheckpointInfo",
    "build_sd_pipeline",
    "bytes_to_unicode",
    "learn_merges",
    "write_tokenizer",
    "SDXL_VARIANTS",
    "SD_VARIANTS",
    "tiny_checkpoint_info",
    "write_tiny_checkpoint",
    "write_tiny_preview_vae",
]

# Native image size of the tiny SD checkpoint: VAE factor 2 and UNet sample_size 32 -> 64x64 px.
SD_NATIVE_SIZE = 64
SD_VAE_SCALE_FACTOR = 2
MODEL_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# SD1.5's scheduler values (its scheduler_config.json), so DDIM timesteps match the real model's.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}

# A few words that prompts in tests and the demo use; BPE merges learned from them keep typical
# prompts far below 77 tokens (unmerged, every character would be a token).
_MERGE_CORPUS = (
    "a photo of the cat dog sitting standing running jumping on in at with and beach street park "
    "grass snow city forest mountain portrait painting man woman person car house red blue green "
    "yellow white black small large cute an old young smiling raising hand hands looking camera "
    "front view side high quality detailed"
)
_NUM_MERGES = 400


@dataclass(frozen=True)
class TinyCheckpointInfo:
    """What a tiny checkpoint is: its folder, family and native image size."""

    path: Path
    family: str
    seed: int
    native_size: int
    vae_scale_factor: int
    transformer_blocks: int

    def describe(self) -> str:
        """One line for humans (the CLI prints it)."""
        return (
            f"tiny {self.family} checkpoint (seed {self.seed}) at {self.path}: native size "
            f"{self.native_size}x{self.native_size}, VAE factor {self.vae_scale_factor}, "
            f"{self.transformer_blocks} transformer blocks"
        )


# --- tokenizer -------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the byte-level alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on a fixed word list; deterministic (ties broken lexicographically)."""
    # CLIP marks the end of a word by suffixing its last symbol with </w>.
    seqs = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words if w)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for seq, n in seqs.items():
            for pair in zip(seq, seq[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for seq, n in seqs.items():
            out: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged[tuple(out)] += n
        seqs = merged
    return merges


def _tokenizer_vocab_and_merges(
    words: list[str], num_merges: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocab layout: byte alphabet, the same with </w>, merged symbols, special tokens."""
    alphabet = list(bytes_to_unicode().values())
    merges = learn_merges(words, num_merges)
    symbols = alphabet + [s + "</w>" for s in alphabet] + ["".join(m) for m in merges]
    symbols += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    return vocab, merges


def write_tokenizer(
    folder: Path,
    pad_token: str = EOS_TOKEN,
    *,
    words: list[str] | None = None,
    num_merges: int = _NUM_MERGES,
) -> int:
    """Write a CLIP tokenizer's files, merges learnt from ``words``; return the vocabulary size.

    SD1.x pads with the end token, as openai/clip-vit-large-patch14 does; SDXL's second
    tokenizer pads with "!". Without ``words``, the tiny checkpoints' own corpus is used.
    """
    corpus = _MERGE_CORPUS.split() if words is None else words
    vocab, merges = _tokenizer_vocab_and_merges(corpus, num_merges)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    special["pad_token"] = pad_token
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return len(vocab)


# --- SD1.x family ----------------------------------------------------------------------------

# Tiny widths, SD1.5 topology. Measured on a 2-core CPU: one UNet forward at 32x32 latents, batch 1,
# takes a few ms, so suites can afford hundreds of evaluations.
SD_TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": SD_NATIVE_SIZE // SD_VAE_SCALE_FACTOR,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 2,
    "norm_num_groups": 4,
    # Legacy diffusers naming: for SD1.x this is the number of heads per attention layer.
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
}

# UNet config changes giving tiny SD-family models of other shapes than SD 1.5's (see above).
SD_VARIANTS: dict[str, dict[str, Any]] = {
    "standard": {},
    # Two levels, one layer per down block: 2 down + 1 mid + 4 up = 7 self-attention blocks.
    "two-level": {
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
    },
    # BK-SDM's cut: no mid block and one layer per down block: 3 down + 6 up = 9 blocks.
    "no-mid": {"mid_block_type": None, "layers_per_block": 1},
    # Three levels, the last without attention: 4 down + 1 mid + 6 up = 11 blocks.
    "three-level": {
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (8, 16, 32),
    },
}

SD_TINY_VAE_CONFIG: dict[str, Any] = {
    "sample_size": SD_NATIVE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
}

SD_TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}


def build_sd_pipeline(
    seed: int = 0,
    *,
    unet_config: dict[str, Any] | None = None,
    vae_config: dict[str, Any] | None = None,
    text_config: dict[str, Any] | None = None,
) -> Any:
    """Seeded random-weight StableDiffusionPipeline, in memory, with a locally written tokenizer.

    Defaults are the tiny configs; the benchmark passes SD1.5's full UNet config instead.
    """
    with tempfile.TemporaryDirectory(prefix="masactrl-tok-") as tmp:
        return _build_sd_pipeline(seed, Path(tmp), unet_config, vae_config, text_config)


def _build_sd_pipeline(
    seed: int,
    tokenizer_dir: Path,
    unet_config: dict[str, Any] | None = None,
    vae_config: dict[str, Any] | None = None,
    text_config: dict[str, Any] | None = None,
) -> Any:
    """Seeded components -> a StableDiffusionPipeline (diffusers' test recipe, local tokenizer)."""
    import torch

    # From their own modules: mypy reads diffusers' top-level names as its no-torch placeholders.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_size = write_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    bos_id, eos_id = tokenizer.convert_tokens_to_ids([BOS_TOKEN, EOS_TOKEN])

    # Reseed before each component so each one's weights depend only on the seed, not on the order
    # or on how many draws the previous component made.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(unet_config or SD_TINY_UNET_CONFIG))
    torch.manual_seed(seed)
    vae = AutoencoderKL(**(vae_config or SD_TINY_VAE_CONFIG))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **(text_config or SD_TINY_TEXT_CONFIG),
            vocab_size=vocab_size,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
    )
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    # diffusers annotates these two as required; it documents and accepts None for both.
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )


# --- SDXL family -----------------------------------------------------------------------------

SDXL_NATIVE_SIZE = 64
SDXL_VAE_SCALE_FACTOR = 2
_SDXL_TEXT_WIDTH = 32
_SDXL_TIME_EMBED_DIM = 8

# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json (Euler, "leading" spacing). Its
# DDIM keys (set_alpha_to_one, clip_sample) are kept in the saved config, and DDIMScheduler reads
# them when the engine builds its sampler from this config, as with the real checkpoint.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
}

# SDXL's topology with tiny widths: 2 + 2x10 + 10 + 3x10 + 3x2 = 70 transformer blocks.
SDXL_TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": SDXL_NATIVE_SIZE // SDXL_VAE_SCALE_FACTOR,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (8, 16, 32),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "norm_num_groups": 4,
    "attention_head_dim": (1, 2, 4),
    "use_linear_projection": True,
    # The two encoders' penultimate hidden states, concatenated (768 + 1280 in SDXL).
    "cross_attention_dim": 2 * _SDXL_TEXT_WIDTH,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _SDXL_TIME_EMBED_DIM,
    # Six time ids, each embedded, plus the pooled projection of the second encoder.
    "projection_class_embeddings_input_dim": 6 * _SDXL_TIME_EMBED_DIM + _SDXL_TEXT_WIDTH,
}

# Distilled SDXL checkpoints (SSD-1B, Segmind Vega) keep SDXL's levels with shallower
# transformer stacks: depths 1/2 instead of 2/10 give 2 + 4 down, 2 mid, 6 + 3 up = 17 blocks.
SDXL_VARIANTS: dict[str, dict[str, Any]] = {
    "standard": {},
    "shallow": {"transformer_layers_per_block": (1, 1, 2)},
}

SDXL_TINY_VAE_CONFIG: dict[str, Any] = {
    **SD_TINY_VAE_CONFIG,
    "sample_size": SDXL_NATIVE_SIZE,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


def build_sdxl_pipeline(
    seed: int = 0,
    *,
    unet_config: dict[str, Any] | None = None,
    vae_config: dict[str, Any] | None = None,
    text_config: dict[str, Any] | None = None,
    text_config_2: dict[str, Any] | None = None,
) -> Any:
    """Seeded random-weight StableDiffusionXLPipeline, in memory, with local tokenizers.

    Defaults are the tiny configs; the benchmark passes SDXL's full UNet config instead.
    """
    with tempfile.TemporaryDirectory(prefix="masactrl-tok-") as tmp:
        return _build_sdxl_pipeline(
            seed, Path(tmp), unet_config, vae_config, text_config, text_config_2
        )


def _build_sdxl_pipeline(
    seed: int,
    tokenizer_dir: Path,
    unet_config: dict[str, Any] | None = None,
    vae_config: dict[str, Any] | None = None,
    text_config: dict[str, Any] | None = None,
    text_config_2: dict[str, Any] | None = None,
) -> Any:
    """Seeded components -> a StableDiffusionXLPipeline (two tokenizers written locally)."""
    import torch

    # From their own modules, as in _build_sd_pipeline.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    vocab_size = write_tokenizer(tokenizer_dir / "tokenizer")
    write_tokenizer(tokenizer_dir / "tokenizer_2", pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer_2")
    bos_id, eos_id = tokenizer.convert_tokens_to_ids([BOS_TOKEN, EOS_TOKEN])
    tiny_text = {
        **SD_TINY_TEXT_CONFIG,
        "hidden_size": _SDXL_TEXT_WIDTH,
        "projection_dim": _SDXL_TEXT_WIDTH,
    }
    ids = {"vocab_size": vocab_size, "bos_token_id": bos_id, "eos_token_id": eos_id}

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(unet_config or SDXL_TINY_UNET_CONFIG))
    torch.manual_seed(seed)
    vae = AutoencoderKL(**(vae_config or SDXL_TINY_VAE_CONFIG))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**(text_config or tiny_text), **ids, pad_token_id=eos_id)
    )
    torch.manual_seed(seed + 1)  # the two encoders must differ
    pad_2 = tokenizer_2.convert_tokens_to_ids("!")
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**(text_config_2 or text_config or tiny_text), **ids, pad_token_id=pad_2)
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


@dataclass(frozen=True)
class _Family:
    build: Callable[[int, Path, dict[str, Any]], Any]
    native_size: int
    vae_scale_factor: int
    unet_config: dict[str, Any]
    # UNet config changes by variant name (other shapes of the family's UNet).
    variants: dict[str, dict[str, Any]]
    # Tokenizer subfolders whose vocab/merges must be the ones this module wrote.
    tokenizer_folders: tuple[str, ...]


FAMILIES: dict[str, _Family] = {
    "sd": _Family(
        _build_sd_pipeline,
        SD_NATIVE_SIZE,
        SD_VAE_SCALE_FACTOR,
        SD_TINY_UNET_CONFIG,
        SD_VARIANTS,
        ("tokenizer",),
    ),
    "sdxl": _Family(
        _build_sdxl_pipeline,
        SDXL_NATIVE_SIZE,
        SDXL_VAE_SCALE_FACTOR,
        SDXL_TINY_UNET_CONFIG,
        SDXL_VARIANTS,
        ("tokenizer", "tokenizer_2"),
    ),
}


def _self_attention_blocks(unet_config: dict[str, Any]) -> int:
    """Counted on the UNet the config builds (on the meta device: no weights are made)."""
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    return sum(1 for name in unet.attn_processors if name.endswith("attn1.processor"))


def tiny_checkpoint_info(
    out_dir: str | Path, *, seed: int = 0, family: str = "sd", variant: str = "standard"
) -> TinyCheckpointInfo:
    """The facts about the checkpoint ``write_tiny_checkpoint`` writes to ``out_dir``: its
    block count is counted on the UNet that its config builds, never looked up."""
    if family in ("sd3", "flux"):
        from masactrl_core.tiny_mmdit import mmdit_checkpoint_info

        _mmdit_variant(family, variant)
        return mmdit_checkpoint_info(out_dir, seed=seed, family=family)
    spec = _family(family)
    path = Path(out_dir)
    config_file = path / "unet" / "config.json"
    if config_file.is_file():
        unet_config = json.loads(config_file.read_text(encoding="utf-8"))
    else:
        unet_config = {**spec.unet_config, **_variant(family, variant)}
    return TinyCheckpointInfo(
        path=path,
        family=family,
        seed=seed,
        native_size=spec.native_size,
        vae_scale_factor=spec.vae_scale_factor,
        transformer_blocks=_self_attention_blocks(unet_config),
    )


def _family(family: str) -> _Family:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(
            f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}"
        ) from None


def _variant(family: str, variant: str) -> dict[str, Any]:
    variants = _family(family).variants
    if variant not in variants:
        raise ValueError(
            f"unknown {family} variant {variant!r}; expected one of {', '.join(variants)}"
        )
    return variants[variant]


def _mmdit_variant(family: str, variant: str) -> None:
    if variant != "standard":
        raise ValueError(f"the tiny {family} checkpoint has one shape; --variant is for sd, sdxl")


def write_tiny_checkpoint(
    out_dir: str | Path, *, seed: int = 0, family: str = "sd", variant: str = "standard"
) -> Path:
    """Write a seeded random-weight checkpoint to `out_dir` and return its path.

    Same seed -> byte-identical weight files. The UNet families have a native size of 64x64 px
    (latents 4x32x32); family "sd" has the SD1.5 block layout (16 transformer blocks) or, with
    ``variant``, one of :data:`SD_VARIANTS`' other shapes; family "sdxl" SDXL's (70 transformer
    blocks, two text encoders). Families "sd3" and "flux" are the multimodal diffusion
    transformers of :mod:`masactrl_core.tiny_mmdit`.
    """
    if family in ("sd3", "flux"):
        from masactrl_core.tiny_mmdit import write_tiny_mmdit_checkpoint

        _mmdit_variant(family, variant)
        return write_tiny_mmdit_checkpoint(out_dir, seed=seed, family=family)
    spec = _family(family)
    changes = _variant(family, variant)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="masactrl-tok-") as tmp:
        pipe = spec.build(seed, Path(tmp), {**spec.unet_config, **changes})
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(out, safe_serialization=True)
        # Tokenizer files are this module's own, whatever the installed transformers would emit
        # (a fast-tokenizer tokenizer.json is derived from them on load).
        for name in spec.tokenizer_folders:
            write_tokenizer(out / name, pad_token="!" if name == "tokenizer_2" else EOS_TOKEN)
    return out


# --- preview autoencoder ---------------------------------------------------------------------

# An AutoencoderTiny (TAESD's architecture) with tiny widths for the tiny checkpoints of both
# families: 4 latent channels, and one halving / doubling stage, like their VAE (factor 2).
TINY_PREVIEW_VAE_CONFIG: dict[str, Any] = {
    "encoder_block_out_channels": (8, 8),
    "decoder_block_out_channels": (8, 8),
    "num_encoder_blocks": (1, 1),
    "num_decoder_blocks": (1, 1),
    "latent_channels": 4,
}


def write_tiny_preview_vae(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a seeded random-weight ``AutoencoderTiny`` that decodes the tiny checkpoints' latents.

    The live-preview decoder a catalog entry names as ``preview_vae``; it goes in its own folder
    (a sibling of the checkpoint), as real TAESD weights do. Same seed -> identical weights.
    """
    import torch
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny

    torch.manual_seed(seed)
    # Every layer, the output convolution included, has PyTorch's random default initialisation:
    # none starts at zero, so its images depend on the latents.
    model = AutoencoderTiny(**TINY_PREVIEW_VAE_CONFIG)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out
