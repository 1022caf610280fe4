"""Train a small Stable-Diffusion-family checkpoint on toy-world scenes, from scratch, on a CPU.

The result is an ordinary diffusers folder (VAE, UNet, CLIP text encoder, tokenizer, DDIM
scheduler) that ``MasaCtrlEngine.from_pretrained`` loads like any SD1.x model. The UNet keeps the
SD1.x topology (4 levels, 2 layers each, 16 transformer blocks: 6 in the encoder, 1 in the middle,
9 in the decoder) at small widths, so the paper's start_layer 10 (the decoder's later blocks)
means the same blocks here.

Two phases share the time budget: the VAE learns to reconstruct scenes (reconstruction plus a small
KL term), then its latents are scaled to unit variance and the UNet and text encoder learn to
denoise them (epsilon prediction, SD1.5's noise schedule, captions dropped 10% of the time so
classifier-free guidance works). Training data is rendered on the fly from consecutive scene seeds.
What makes a CPU budget enough: warm-up then cosine learning rate, Min-SNR-5 loss weights (Hang
et al. 2023: converges several times faster than plain epsilon MSE) and an exponential moving
average of the weights, which is what is saved and sampled.

Reproducibility: every random draw comes from the seed. Training stops at ``max_steps`` or at the
deadline, whichever comes first; ``training.json`` records the steps reached, and rerunning with
that many steps and no deadline reproduces the weights (on the same torch build and thread count).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from masactrl_toy.world import caption, random_scene, render, vocabulary

__all__ = ["ToyConfig", "TrainResult", "build_pipeline", "train", "write_tokenizer"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# The paper's defaults, declared with the checkpoint (see docs/toy-world.md).
DEFAULT_CONTROL = {"start_step": 4, "start_layer": 10}
SAMPLE_PROMPTS = (
    "a creature with arms up standing facing left on grass on the left",
    "a creature with arms down sitting facing right on snow on the right",
    "a creature with arms up sitting facing right on sand on the left",
    "a creature with arms down standing facing left on room on the right",
)


@dataclass(frozen=True)
class ToyConfig:
    """Sizes and optimiser settings; the defaults are the early-measurement model (32 px)."""

    image_size: int = 32
    vae_channels: tuple[int, int] = (16, 32)  # two levels: latents are image_size / 2
    # Wide low-resolution levels are cheap (4x4 and 2x2 latents) and carry the caption's layout.
    unet_channels: tuple[int, int, int, int] = (32, 64, 128, 128)
    unet_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    batch_size: int = 16
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    warmup_steps: int = 200  # linear warm-up; then cosine decay to 10% when the steps are known
    ema_decay: float = 0.999  # the saved weights are an exponential moving average
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting: low-noise steps stop dominating
    vae_fraction: float = 0.2  # share of the step and time budget spent on the VAE
    caption_dropout: float = 0.1
    kl_weight: float = 1e-6
    sample_every_s: float = 180.0

    def unet_config(self) -> dict[str, Any]:
        return {
            "sample_size": self.image_size // 2,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "block_out_channels": self.unet_channels,
            "layers_per_block": 2,
            "norm_num_groups": 8,
            # Legacy diffusers naming: for SD1.x this is the number of heads.
            "attention_head_dim": self.unet_heads,
            "cross_attention_dim": self.text_width,
        }

    def vae_config(self) -> dict[str, Any]:
        return {
            "sample_size": self.image_size,
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "block_out_channels": self.vae_channels,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "latent_channels": 4,
        }

    def text_config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.text_width,
            "intermediate_size": self.text_width * 2,
            "num_attention_heads": 4,
            "num_hidden_layers": self.text_layers,
            "projection_dim": self.text_width,
            "max_position_embeddings": MODEL_MAX_LENGTH,
            "layer_norm_eps": 1e-5,
            "hidden_act": "quick_gelu",
        }


@dataclass
class TrainResult:
    path: Path
    seed: int
    vae_steps: int
    unet_steps: int
    seconds: float
    vae_losses: list[float] = field(default_factory=list)
    unet_losses: list[float] = field(default_factory=list)


def write_tokenizer(folder: Path) -> int:
    """CLIP tokenizer files for the world's vocabulary (one token per word); returns vocab size."""
    # The tiny checkpoints' byte-level BPE writer, merging until every word is a single token.
    from masactrl_core.tiny import write_tokenizer as write_clip_tokenizer

    words = vocabulary()
    return write_clip_tokenizer(folder, words=words, num_merges=sum(len(w) for w in words))


def build_pipeline(config: ToyConfig, seed: int, tokenizer_dir: Path) -> Any:
    """Seeded untrained components -> a StableDiffusionPipeline with the world's tokenizer."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from masactrl_core.tiny import SD15_SCHEDULER_CONFIG

    vocab_size = write_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    bos_id, eos_id = tokenizer.convert_tokens_to_ids([BOS_TOKEN, EOS_TOKEN])
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config.unet_config())
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config.vae_config())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **config.text_config(),
            vocab_size=vocab_size,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )


class _Scenes:
    """Batches of (image tensor in [-1, 1], caption), rendered from consecutive scene seeds."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.next_seed = seed * 10_000_019  # disjoint scene streams for different training seeds

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        images, captions = [], []
        for _ in range(n):
            scene = random_scene(self.next_seed)
            self.next_seed += 1
            image, _ = render(scene, self.size)
            images.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
            captions.append(caption(scene))
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), captions


def _encode_text(pipe: Any, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    hidden: torch.Tensor = pipe.text_encoder(ids)[0]
    return hidden


def train(
    out: Path,
    *,
    seed: int = 0,
    minutes: float = 5.0,
    max_steps: int | None = None,
    config: ToyConfig | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> TrainResult:
    """Train for `minutes` (or `max_steps` steps, whichever ends first) and save to `out`.

    `progress(phase, step, total, loss)` is called after every step; `total` is the step budget,
    or 0 when only the deadline bounds the phase.
    """
    config = config or ToyConfig()
    if minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes}")
    random.seed(seed)
    np.random.seed(seed)
    started = time.monotonic()
    budget_s = minutes * 60.0
    vae_steps = None if max_steps is None else max(1, round(max_steps * config.vae_fraction))
    unet_steps = None if max_steps is None else max(1, max_steps - (vae_steps or 0))
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="masactrl-toy-tok-") as tmp:
        pipe = build_pipeline(config, seed, Path(tmp))
    result = TrainResult(out, seed, 0, 0, 0.0)
    scenes = _Scenes(config.image_size, seed)
    generator = torch.Generator().manual_seed(seed)

    vae_deadline = started + budget_s * config.vae_fraction
    result.vae_losses = _train_vae(
        pipe, config, scenes, generator, vae_steps, vae_deadline, progress
    )
    result.vae_steps = len(result.vae_losses)
    _set_latent_scale(pipe, scenes)
    result.unet_losses = _train_unet(
        pipe, config, scenes, generator, unet_steps, started + budget_s, out, progress
    )
    result.unet_steps = len(result.unet_losses)
    result.seconds = time.monotonic() - started
    _save(pipe, out, config, result)
    return result


def _train_vae(
    pipe: Any,
    config: ToyConfig,
    scenes: _Scenes,
    generator: torch.Generator,
    steps: int | None,
    deadline: float,
    progress: Callable[[str, int, int, float], None] | None,
) -> list[float]:
    vae = pipe.vae
    vae.train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    losses: list[float] = []
    while (steps is None or len(losses) < steps) and time.monotonic() < deadline:
        images, _ = scenes.batch(config.batch_size)
        posterior = vae.encode(images).latent_dist
        latents = posterior.sample(generator=generator)
        recon = vae.decode(latents).sample
        loss = F.mse_loss(recon, images) + config.kl_weight * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if progress:
            progress("vae", len(losses), steps or 0, losses[-1])
    vae.eval()
    vae.requires_grad_(False)
    return losses


@torch.no_grad()
def _set_latent_scale(pipe: Any, scenes: _Scenes) -> None:
    """SD's scaling_factor: 1 / std of the latents, so the diffusion sees unit-variance inputs."""
    images, _ = scenes.batch(64)
    latents = pipe.vae.encode(images).latent_dist.mean
    pipe.vae.register_to_config(scaling_factor=float(1.0 / latents.std().clamp(min=1e-4)))


def _train_unet(
    pipe: Any,
    config: ToyConfig,
    scenes: _Scenes,
    generator: torch.Generator,
    steps: int | None,
    deadline: float,
    out: Path,
    progress: Callable[[str, int, int, float], None] | None,
) -> list[float]:
    from diffusers.training_utils import EMAModel

    unet, text_encoder, scheduler = pipe.unet, pipe.text_encoder, pipe.scheduler
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimiser = torch.optim.AdamW(params, lr=config.unet_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: _lr_factor(step, config.warmup_steps, steps)
    )
    ema = EMAModel(params, decay=config.ema_decay, use_ema_warmup=True)
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    snr_weight = snr.clamp(max=config.min_snr_gamma) / snr  # for epsilon prediction
    scale = pipe.vae.config.scaling_factor
    losses: list[float] = []
    next_sample = time.monotonic() + config.sample_every_s
    while (steps is None or len(losses) < steps) and time.monotonic() < deadline:
        images, captions = scenes.batch(config.batch_size)
        drop = torch.rand(len(captions), generator=generator) < config.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        with torch.no_grad():
            latents = pipe.vae.encode(images).latent_dist.sample(generator=generator) * scale
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(captions),), generator=generator
        )
        noisy = scheduler.add_noise(latents, noise, t)
        predicted = unet(noisy, t, encoder_hidden_states=_encode_text(pipe, captions)).sample
        per_sample = F.mse_loss(predicted, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * snr_weight[t]).mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        ema.step(params)
        # The unweighted loss is what the progress bar and the record show: comparable across
        # weightings and with the early runs.
        losses.append(per_sample.mean().item())
        if progress:
            progress("unet", len(losses), steps or 0, losses[-1])
        if time.monotonic() >= next_sample:
            with _averaged(ema, params):
                write_sample_grid(pipe, out / "samples" / f"step_{len(losses):06d}.png")
            next_sample = time.monotonic() + config.sample_every_s
    ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    return losses


def _lr_factor(step: int, warmup: int, total: int | None) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if total is None or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def _averaged(ema: Any, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """The moving-average weights in place for a while (sample grids), then the live ones back."""
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


@torch.no_grad()
def write_sample_grid(pipe: Any, path: Path, steps: int = 20, seed: int = 0) -> Path:
    """One row per sample prompt, two seeds each, at the training resolution."""
    was_training = pipe.unet.training
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for prompt in SAMPLE_PROMPTS:
        for k in range(2):
            generator = torch.Generator().manual_seed(seed + k)
            images += pipe(prompt, num_inference_steps=steps, generator=generator).images
    size = images[0].width
    grid = Image.new("RGB", (size * 2, size * len(SAMPLE_PROMPTS)))
    for i, image in enumerate(images):
        grid.paste(image, ((i % 2) * size, (i // 2) * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    if was_training:
        pipe.unet.train()
        pipe.text_encoder.train()
    return path


def _save(pipe: Any, out: Path, config: ToyConfig, result: TrainResult) -> None:
    write_sample_grid(pipe, out / "samples" / "final.png")
    # Stored in float16 (half the bytes, so the repository can carry it; loaders upcast).
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)
    write_tokenizer(out / "tokenizer")  # our files, whatever transformers would emit
    # The default control, and the words the model was trained on: prompts with other words
    # get a warning (masactrl_core.vocabulary), since the model cannot draw what it never saw.
    declaration = {**DEFAULT_CONTROL, "vocabulary": vocabulary()}
    (out / "masactrl.json").write_text(json.dumps(declaration, indent=2) + "\n")
    tail = result.unet_losses[-50:] or [math.nan]
    record = {
        "seed": result.seed,
        "config": asdict(config),
        "vae_steps": result.vae_steps,
        "unet_steps": result.unet_steps,
        "seconds": round(result.seconds, 1),
        "final_unet_loss": float(np.mean(tail)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
