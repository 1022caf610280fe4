"""Benchmark: this engine vs a re-creation of the authors' MasaCtrl procedure, SD1.5 and SDXL.

Both variants run a single-target real-image edit on a full-size UNet architecture (built from its
config with seeded random weights; nothing is downloaded): SD1.5's at 512x512 (64x64 latents), or
with ``--family sdxl`` SDXL's (70 transformer blocks, two text encoders, added time ids) at
1024x1024 (128x128 latents):

* reference -- the authors' procedure (TencentARC/MasaCtrl, ``MasaCtrlPipeline`` plus
  ``regiter_attention_editor_diffusers``): every attention layer materializes QK^T and its softmax,
  the editor counts calls to find its layer and step, inversion runs classifier-free guidance on
  the empty prompt (2 images per step), and denoising pushes [source, target] x guidance = 4
  images per step.
* ours -- ``MasaCtrlEngine.edit`` from masactrl_core with its SDPA attention processors: unguided
  inversion (1 image per step) and a shared source branch, 1 + 2N = 3 images per step (SDXL's
  zeroed unconditional embedding differs from the encoded empty source prompt: 4 per step there).

``--mask manual`` and ``--mask auto`` time the mask-guided variants: the authors'
``MutualSelfAttentionControlMask`` (a foreground and a background softmax over the full QK^T of
the target, blended by the target mask) and ``MutualSelfAttentionControlMaskAuto`` (masks from
cross-attention maps of a word, collected on the quarter-resolution grid) against the engine's
``MaskConfig(regions=...)`` and ``MaskConfig(source_word=..., target_word=...)``.

``--condition controlnet`` adds layout guidance: SD1.5's ControlNet architecture (built from the
UNet's config, seeded; its output convolutions stay zero, which costs the same time) on a canny
edge map of the image. The reference runs the ControlNet on all four rows of its batch and zeroes
the source rows' residuals; ours runs it on the target's two rows only (``condition_evals``).

Each variant runs in its own subprocess (clean peak-memory accounting) for a short edit of
2 x --steps steps with control from step --steps on, so that inversion, uncontrolled and
controlled denoising steps are all timed. Only UNet calls are timed (forward hooks); seconds per
50-step edit are extrapolated as 50 t_invert + 4 t_denoise + 46 t_denoise_controlled (the paper's
start step 4). Peak memory is that of the short run, which already contains every kind of step.

    python bench/core.py                                  # CPU float32 (5-7 min on 2 cores)
    python bench/core.py --mask manual                    # mask-guided, same setting
    python bench/core.py --family sdxl                    # CPU bfloat16 at 1024x1024
    python bench/core.py --condition controlnet           # with an SD1.5 ControlNet
    python bench/core.py --device cuda --dtype float16 --steps 3
    python bench/core.py --family flux                    # FLUX.1 (bench/mmdit.py), ~3 min CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# SD1.5's unet/config.json (stable-diffusion-v1-5), written out so no download is needed.
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

# The UNet is what is measured; the VAE and text encoder only have to produce the right shapes
# (scale factor 8, 4 latent channels, 768-wide embeddings), so they are narrow stand-ins that
# cost both variants the same negligible time and memory.
STAND_IN_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "sample_size": 512,
}
STAND_IN_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 768,
    "num_attention_heads": 12,
    "num_hidden_layers": 1,
    "projection_dim": 768,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
# SDXL's encoders are 768 and 1280 wide; the second projects its pooled output to 1280.
STAND_IN_TEXT_CONFIG_2: dict[str, Any] = {
    **STAND_IN_TEXT_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 1280,
    "num_attention_heads": 20,
    "projection_dim": 1280,
}


@dataclass(frozen=True)
class Family:
    """What differs between the SD1.5 and SDXL runs."""

    name: str
    label: str
    unet_config: dict[str, Any]
    size: int
    start_layer: int
    cpu_dtype: str


FAMILIES = {
    "sd": Family("sd", "SD1.5", SD15_UNET_CONFIG, 512, 10, "float32"),
    # float32 SDXL weights are 10 GiB and the reference's explicit attention at 4096 tokens adds
    # ~8 GiB more: too close to the 24 GiB of the 2-core box shared with other work. bfloat16
    # halves both (and this CPU has AMX for it); both variants run in the same dtype.
    "sdxl": Family("sdxl", "SDXL", SDXL_UNET_CONFIG, 1024, 44, "bfloat16"),
}

EDIT_STEPS = 50  # the paper's sampling steps
PAPER_START_STEP = 4
PAPER_START_LAYER = 10
GUIDANCE = 7.5
TARGET_PROMPT = "a photo of a running cat"
# Automatic masks need the object's word in the source prompt, so that variant describes it.
MASK_WORD = "cat"
AUTO_SOURCE_PROMPT = "a photo of a cat"
MASK_THRESHOLD = 0.1  # the authors' default and ours
# Manual masks, as fractions of the image (left, top, right, bottom): the object moves left.
SOURCE_BOX = (0.25, 0.2, 0.75, 1.0)
TARGET_BOX = (0.1, 0.25, 0.6, 1.0)
TIME_TARGET = 0.7
MEMORY_TARGET = 0.6


# --- measurement helpers ---------------------------------------------------------------------


@dataclass
class UNetTimer:
    """Times every UNet call with forward hooks; steps are delimited by ``mark``."""

    sync: Callable[[], None]
    verbose: bool = True
    calls: list[tuple[int, float, float]] = field(default_factory=list)  # images, wall, CPU s
    steps: list[dict[str, Any]] = field(default_factory=list)
    # Another model timed step by step alongside (the ControlNet), closed by the same marks.
    companion: UNetTimer | None = None
    _started: float = 0.0
    _cpu_started: float = 0.0
    _consumed: int = 0

    def attach(self, unet: Any) -> None:
        unet.register_forward_pre_hook(self._before)
        unet.register_forward_hook(self._after)

    def _before(self, module: Any, args: tuple) -> None:
        self.sync()
        self._started = time.perf_counter()
        self._cpu_started = time.process_time()

    def _after(self, module: Any, args: tuple, output: Any) -> None:
        self.sync()
        wall = time.perf_counter() - self._started
        self.calls.append((int(args[0].shape[0]), wall, time.process_time() - self._cpu_started))

    def mark(self, phase: str, step: int, controlled: bool) -> None:
        """Close one step: everything the UNet did since the previous mark belongs to it."""
        if self.companion is not None:
            self.companion.mark(phase, step, controlled)
        calls = self.calls[self._consumed :]
        self._consumed = len(self.calls)
        record = {
            "phase": phase,
            "step": step,
            "controlled": controlled,
            "images": sum(call[0] for call in calls),
            "seconds": sum(call[1] for call in calls),
            "cpu_seconds": sum(call[2] for call in calls),
        }
        self.steps.append(record)
        if not self.verbose:
            return
        print(
            f"  {phase:7} step {step}{' (controlled)' if controlled else ''}: "
            f"{record['images']} images, {record['seconds']:.2f} s "
            f"({record['cpu_seconds']:.2f} CPU s)",
            file=sys.stderr,
            flush=True,
        )


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} missing from /proc/self/status")


class CpuPeak:
    """Peak resident memory of this process during a block, via the kernel's high-water mark.

    Writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS (Linux >= 4.0); where that
    is refused, a 5 ms sampling thread stands in (it can miss very short spikes).
    """

    def __enter__(self) -> CpuPeak:
        gc.collect()
        self.baseline = _rss_bytes("VmRSS")
        self.method = "VmHWM"
        self._stop = threading.Event()
        self._sampled = self.baseline
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
        except OSError:
            self.method = "sampling"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, _rss_bytes("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        if self.method == "VmHWM":
            self.peak = _rss_bytes("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self._sampled


class CudaPeak:
    """Peak allocated CUDA memory during a block (weights included), and the baseline."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.method = "torch.cuda.max_memory_allocated"

    def __enter__(self) -> CudaPeak:
        import torch

        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)


# --- the reference procedure, re-created ------------------------------------------------------
# Mirrors masactrl/masactrl_utils.py (AttentionBase, regiter_attention_editor_diffusers),
# masactrl/masactrl.py (MutualSelfAttentionControl) and masactrl/diffuser_utils.py
# (MasaCtrlPipeline.invert / __call__, next_step / step), as diffusers attention processors.


def _heads_first(t: Any, heads: int) -> Any:
    """'b n (h d) -> (b h) n d'."""
    b, n, hd = t.shape
    return t.reshape(b, n, heads, hd // heads).permute(0, 2, 1, 3).reshape(b * heads, n, -1)


def _heads_last(t: Any, heads: int) -> Any:
    """'(b h) n d -> b n (h d)'."""
    bh, n, d = t.shape
    return t.reshape(bh // heads, heads, n, d).permute(0, 2, 1, 3).reshape(bh // heads, n, -1)


class ReferenceEditor:
    """AttentionBase + MutualSelfAttentionControl: finds layer and step by counting calls."""

    def __init__(
        self, num_att_layers: int, start_step: int, start_layer: int, total_steps: int
    ) -> None:
        self.num_att_layers = num_att_layers
        self.step_idx = list(range(start_step, total_steps))
        self.layer_idx = list(range(start_layer, num_att_layers // 2))
        self.cur_step = 0
        self.cur_att_layer = 0

    def __call__(self, q, k, v, sim, attn, is_cross, num_heads, scale):
        out = self.forward(q, k, v, sim, attn, is_cross, num_heads, scale)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.after_step()
        return out

    def after_step(self) -> None:
        pass

    def controls(self, is_cross: bool) -> bool:
        return (
            not is_cross
            and self.cur_step in self.step_idx
            and self.cur_att_layer // 2 in self.layer_idx
        )

    def forward(self, q, k, v, sim, attn, is_cross, num_heads, scale):
        import torch

        # attn1 and attn2 alternate, so call index // 2 is the transformer block.
        if (
            is_cross
            or self.cur_step not in self.step_idx
            or self.cur_att_layer // 2 not in self.layer_idx
        ):
            return _heads_last(torch.einsum("b i j, b j d -> b i d", attn, v), num_heads)
        qu, qc = q.chunk(2)
        ku, kc = k.chunk(2)
        vu, vc = v.chunk(2)
        out_u = self._attn_batch(qu, ku[:num_heads], vu[:num_heads], num_heads, scale)
        out_c = self._attn_batch(qc, kc[:num_heads], vc[:num_heads], num_heads, scale)
        return torch.cat([out_u, out_c], dim=0)

    @staticmethod
    def _attn_batch(q, k, v, num_heads, scale):
        import torch

        b = q.shape[0] // num_heads
        # '(b h) n d -> h (b n) d': every image's queries against the source's keys.
        q = q.reshape(b, num_heads, *q.shape[1:]).permute(1, 0, 2, 3).flatten(1, 2)
        sim = torch.einsum("h i d, h j d -> h i j", q, k) * scale
        attn = sim.softmax(-1)
        out = torch.einsum("h i j, h j d -> h i d", attn, v)
        # 'h (b n) d -> b n (h d)'
        h, bn, d = out.shape
        return out.reshape(h, b, bn // b, d).permute(1, 2, 0, 3).reshape(b, bn // b, h * d)


def _masked_attn(q, k, v, num_heads, scale, key_mask):
    """The authors' ``attn_batch`` under a source mask: (foreground, background) outputs.

    ``sim + mask.masked_fill(mask == 0, min)`` for the foreground and the converse for the
    background, both over the full QK^T, as MutualSelfAttentionControlMask computes them.
    """
    import torch

    b = q.shape[0] // num_heads
    q = q.reshape(b, num_heads, *q.shape[1:]).permute(1, 0, 2, 3).flatten(1, 2)
    sim = torch.einsum("h i d, h j d -> h i j", q, k) * scale
    lowest = torch.finfo(sim.dtype).min
    sim_fg = sim + key_mask.masked_fill(key_mask == 0, lowest)
    sim_bg = sim + key_mask.masked_fill(key_mask == 1, lowest)
    attn = torch.cat([sim_fg, sim_bg]).softmax(-1)
    out = torch.einsum("h i j, h j d -> h i d", attn, torch.cat([v, v]))
    h2, bn, d = out.shape
    out = out.reshape(2, h2 // 2, b, bn // b, d).permute(0, 2, 3, 1, 4)
    return out.reshape(2, b, bn // b, (h2 // 2) * d)


class ReferenceMaskEditor(ReferenceEditor):
    """MutualSelfAttentionControlMask: the target reads the source's foreground and background
    separately; the two outputs are blended with the target mask. One foreground only."""

    def __init__(self, *args, mask_s: Any, mask_t: Any) -> None:
        super().__init__(*args)
        self.mask_s, self.mask_t = mask_s, mask_t

    def forward(self, q, k, v, sim, attn, is_cross, num_heads, scale):
        import torch

        if not self.controls(is_cross):
            return super().forward(q, k, v, sim, attn, is_cross, num_heads, scale)
        res = int(q.shape[1] ** 0.5)
        qu, qc = q.chunk(2)
        ku, kc = k.chunk(2)
        vu, vc = v.chunk(2)
        outs = []
        for qh, kh, vh in ((qu, ku, vu), (qc, kc, vc)):
            source = self._attn_batch(
                qh[:num_heads], kh[:num_heads], vh[:num_heads], num_heads, scale
            )
            key_mask, blend = self.masks(res, q.dtype)
            if key_mask is None:
                target = self._attn_batch(
                    qh[num_heads:], kh[:num_heads], vh[:num_heads], num_heads, scale
                )
            else:
                fg, bg = _masked_attn(
                    qh[num_heads:], kh[:num_heads], vh[:num_heads], num_heads, scale, key_mask
                )
                target = fg * blend + bg * (1 - blend)
            outs += [source, target]
        return torch.cat([outs[0], outs[1], outs[2], outs[3]], dim=0)

    def masks(self, res: int, dtype: Any) -> tuple[Any, Any]:
        import torch.nn.functional as F

        key_mask = F.interpolate(self.mask_s[None, None], (res, res)).flatten().to(dtype)
        blend = F.interpolate(self.mask_t[None, None], (res, res)).reshape(-1, 1).to(dtype)
        return key_mask, blend


class ReferenceAutoMaskEditor(ReferenceMaskEditor):
    """MutualSelfAttentionControlMaskAuto: masks from the cross-attention maps of a word.

    Maps of every image are collected (heads averaged) from the cross-attention layers whose grid
    is a quarter of the latent grid (the authors hard-code 16x16, SD at 512 px) and reset after
    each step; a controlled layer reached before any map is unmasked.
    """

    def __init__(self, *args, map_tokens: int, ref_idx: list[int], cur_idx: list[int]) -> None:
        super().__init__(*args, mask_s=None, mask_t=None)
        self.map_tokens, self.ref_idx, self.cur_idx = map_tokens, ref_idx, cur_idx
        self.cross_attns: list[Any] = []

    def after_step(self) -> None:
        self.cross_attns = []

    def forward(self, q, k, v, sim, attn, is_cross, num_heads, scale):
        if is_cross and attn.shape[1] == self.map_tokens:
            self.cross_attns.append(attn.reshape(-1, num_heads, *attn.shape[-2:]).mean(1))
        return super().forward(q, k, v, sim, attn, is_cross, num_heads, scale)

    def aggregate(self, idx: list[int]) -> Any:
        import torch

        attn_map = torch.stack(self.cross_attns, dim=1).mean(1)
        res = int(attn_map.shape[-2] ** 0.5)
        image = attn_map.reshape(-1, res, res, attn_map.shape[-1])[..., idx].sum(-1)
        low = image.amin(dim=(1, 2), keepdim=True)
        high = image.amax(dim=(1, 2), keepdim=True)
        return (image - low) / (high - low)

    def masks(self, res: int, dtype: Any) -> tuple[Any, Any]:
        import torch.nn.functional as F

        if not self.cross_attns:
            return None, None
        # Rows are [u_src, u_tgt, c_src, c_tgt]: the conditional half's maps serve both halves.
        source = self.aggregate(self.ref_idx)[-2]
        target = self.aggregate(self.cur_idx)[-1]
        key_mask = F.interpolate(source[None, None], (res, res)).flatten()
        blend = F.interpolate(target[None, None], (res, res)).reshape(-1, 1)
        key_mask = (key_mask >= MASK_THRESHOLD).to(dtype)
        blend = (blend >= MASK_THRESHOLD).to(dtype)
        return key_mask, blend


class ReferenceAttnProcessor:
    """The authors' patched ``Attention.forward``: explicit QK^T and softmax, then the editor."""

    def __init__(self, editor: ReferenceEditor) -> None:
        self.editor = editor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        import torch

        h = attn.heads
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = _heads_first(attn.to_q(hidden_states), h)
        k = _heads_first(attn.to_k(context), h)
        v = _heads_first(attn.to_v(context), h)
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * attn.scale
        probs = sim.softmax(dim=-1)
        out = self.editor(q, k, v, sim, probs, is_cross, h, attn.scale)
        return attn.to_out[0](out)


def _ddim_next(scheduler: Any, eps: Any, t: int, x: Any) -> Any:
    """MasaCtrlPipeline.next_step (inversion)."""
    prev = min(t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps, 999)
    a_t = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    a_next = scheduler.alphas_cumprod[t]
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps


def _ddim_prev(scheduler: Any, eps: Any, t: int, x: Any) -> Any:
    """MasaCtrlPipeline.step (sampling)."""
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[prev] if prev > 0 else scheduler.final_alpha_cumprod
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


@dataclass(frozen=True)
class Setup:
    """One benchmarked configuration: model family and mask mode."""

    family: Family
    mask: str = "none"  # none | manual | auto
    condition: str = "none"  # none | controlnet

    @property
    def source_prompt(self) -> str:
        return AUTO_SOURCE_PROMPT if self.mask == "auto" else ""


def _box_mask(size: int, box: tuple[float, float, float, float]) -> Any:
    """A (size, size) float 0/1 mask with ones inside the fractional ``box``."""
    import torch

    mask = torch.zeros(size, size)
    left, top, right, bottom = (round(f * size) for f in box)
    mask[top:bottom, left:right] = 1.0
    return mask


def _word_positions(tokenizer: Any, prompt: str, word: str) -> list[int]:
    ids = tokenizer(prompt).input_ids
    (word_id,) = tokenizer(word, add_special_tokens=False).input_ids
    return [i for i, token in enumerate(ids) if token == word_id]


def _encoder(pipe: Any, family: str, size: int) -> Callable[..., tuple[Any, Any]]:
    """prompts -> (encoder_hidden_states, added_cond_kwargs) as the authors' pipelines encode."""
    import torch

    device = pipe.unet.device

    def encode(prompts: list[str], zeros: bool = False) -> tuple[Any, Any]:
        if family == "sd":
            ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
            return pipe.text_encoder(ids.input_ids.to(device))[0], None
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        if zeros:  # StableDiffusionXLPipeline's unconditional embedding (force_zeros)
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(device).expand(len(prompts), -1)}
        return embeds, added

    return encode


def _cat(*parts: tuple[Any, Any]) -> tuple[Any, Any]:
    import torch

    embeds = torch.cat([p[0] for p in parts])
    if parts[0][1] is None:
        return embeds, None
    return embeds, {key: torch.cat([p[1][key] for p in parts]) for key in parts[0][1]}


def _use_ddim(pipe: Any) -> None:
    """MasaCtrlPipeline samples with DDIM whatever the checkpoint ships (SDXL ships Euler)."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)


def reference_edit(
    pipe: Any,
    image: Any,
    steps: int,
    start_step: int,
    timer: UNetTimer,
    setup: Setup,
    controlnet: Any = None,
    condition_image: Any = None,
) -> tuple[int, int, Any]:
    """Invert with guidance (on the source prompt), then denoise [source, target] x guidance.

    With a ControlNet, it runs on all four rows and the source rows' residuals are zeroed.
    Returns the UNet and ControlNet image-evaluations and the final [source, target] latents.
    """
    import numpy as np
    import torch

    unet, device, dtype = pipe.unet, pipe.unet.device, pipe.unet.dtype
    num_att_layers = len(unet.attn_processors)
    scaling = pipe.vae.config.scaling_factor
    _use_ddim(pipe)
    encode = _encoder(pipe, setup.family.name, image.width)

    evals = 0
    with torch.no_grad():
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)
        pixels = pixels.permute(2, 0, 1)[None].to(device, dtype)
        latents = pipe.vae.encode(pixels)["latent_dist"].mean * scaling

        # Inversion: AttentionBase registered (explicit attention, no control), guidance with
        # the encoded empty prompt as the unconditional branch (MasaCtrlPipeline.invert).
        unet.set_attn_processor(ReferenceAttnProcessor(ReferenceEditor(num_att_layers, 0, 0, 0)))
        embeds, added = _cat(encode([""]), encode([setup.source_prompt]))
        pipe.scheduler.set_timesteps(steps)
        for i, t in enumerate(reversed(pipe.scheduler.timesteps)):
            eps_u, eps_c = unet(
                torch.cat([latents] * 2), t, encoder_hidden_states=embeds, added_cond_kwargs=added
            ).sample.chunk(2)
            latents = _ddim_next(
                pipe.scheduler, eps_u + GUIDANCE * (eps_c - eps_u), int(t), latents
            )
            evals += 2
            timer.mark("invert", i, False)

        d_evals, condition_evals, latents = reference_denoise(
            pipe, latents, steps, start_step, timer, setup, setup.source_prompt, controlnet,
            condition_image, image_size=image.width,
        )  # fmt: skip
        evals += d_evals
    return evals, condition_evals, latents


def reference_denoise(
    pipe: Any,
    latents: Any,
    steps: int,
    start_step: int,
    timer: UNetTimer,
    setup: Setup,
    source_prompt: str,
    controlnet: Any = None,
    condition_image: Any = None,
    *,
    image_size: int,
) -> tuple[int, int, Any]:
    """The authors' denoising of [source, target] x guidance from x_T ``latents`` (1 row).

    With a ControlNet, it runs on all four rows and the source rows' residuals are zeroed.
    Returns the UNet and ControlNet image-evaluations and the final [source, target] latents.
    """
    import numpy as np
    import torch

    unet, device, dtype = pipe.unet, pipe.unet.device, pipe.unet.dtype
    num_att_layers = len(unet.attn_processors)
    scaling = pipe.vae.config.scaling_factor
    _use_ddim(pipe)
    encode = _encoder(pipe, setup.family.name, image_size)
    mask_size = image_size // 8  # the authors' masks are latent-sized
    evals = condition_evals = 0
    if controlnet is not None:
        condition = torch.from_numpy(np.asarray(condition_image, dtype=np.float32) / 255)
        condition = condition.permute(2, 0, 1)[None].expand(4, -1, -1, -1).to(device, dtype)
        # Rows [u_src, u_tgt, c_src, c_tgt]: only the target is conditioned.
        target_rows = torch.tensor([0, 1, 0, 1], device=device, dtype=dtype).view(-1, 1, 1, 1)
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        # Denoising with mutual self-attention control: batch [u_src, u_tgt, c_src, c_tgt].
        editor_args = (num_att_layers, start_step, setup.family.start_layer, steps)
        editor: ReferenceEditor
        if setup.mask == "manual":
            editor = ReferenceMaskEditor(
                *editor_args,
                mask_s=_box_mask(mask_size, SOURCE_BOX).to(device),
                mask_t=_box_mask(mask_size, TARGET_BOX).to(device),
            )
        elif setup.mask == "auto":
            editor = ReferenceAutoMaskEditor(
                *editor_args,
                map_tokens=(latents.shape[-2] // 4) * (latents.shape[-1] // 4),
                ref_idx=_word_positions(pipe.tokenizer, setup.source_prompt, MASK_WORD),
                cur_idx=_word_positions(pipe.tokenizer, TARGET_PROMPT, MASK_WORD),
            )
        else:
            editor = ReferenceEditor(*editor_args)
        unet.set_attn_processor(ReferenceAttnProcessor(editor))
        # SD encodes "" as the unconditional branch; the SDXL pipeline zeroes it.
        unconditional = encode(["", ""], zeros=setup.family.name == "sdxl")
        embeds, added = _cat(unconditional, encode([source_prompt, TARGET_PROMPT]))
        latents = latents.expand(2, -1, -1, -1)
        for i, t in enumerate(pipe.scheduler.timesteps):
            rows = torch.cat([latents] * 2)
            residuals = {}
            if controlnet is not None:
                down, mid = controlnet(
                    rows,
                    t,
                    encoder_hidden_states=embeds,
                    controlnet_cond=condition,
                    added_cond_kwargs=added,
                    return_dict=False,
                )
                residuals = {
                    "down_block_additional_residuals": [d * target_rows for d in down],
                    "mid_block_additional_residual": mid * target_rows,
                }
                condition_evals += 4
            eps_u, eps_c = unet(
                rows, t, encoder_hidden_states=embeds, added_cond_kwargs=added, **residuals
            ).sample.chunk(2)
            latents = _ddim_prev(
                pipe.scheduler, eps_u + GUIDANCE * (eps_c - eps_u), int(t), latents
            )
            evals += 4
            timer.mark("denoise", i, i >= start_step)
        pipe.vae.decode(latents / scaling)
    return evals, condition_evals, latents


def ours_edit(
    pipe: Any,
    image: Any,
    steps: int,
    start_step: int,
    timer: UNetTimer,
    setup: Setup,
    controlnet: Any = None,
    condition_image: Any = None,
    inversion_guidance: float = 1.0,
) -> tuple[int, int, Any]:
    """MasaCtrlEngine.edit with the paper's layers, control from ``start_step``."""
    from PIL import Image

    from masactrl_core import Condition, ControlConfig, MasaCtrlEngine, MaskConfig
    from masactrl_core.conditions import ConditionModel

    engine = MasaCtrlEngine(pipe, family=setup.family.name)

    def progress(phase: str, step: int, total: int) -> None:
        timer.mark(phase, step - 1, phase == "denoise" and step - 1 >= start_step)

    def as_image(mask: Any) -> Image.Image:
        return Image.fromarray((mask * 255).byte().numpy(), mode="L")

    masks = None
    if setup.mask == "manual":
        size = image.width // 8  # the reference's masks are latent-sized: the same pixels
        masks = MaskConfig(
            regions=[(as_image(_box_mask(size, SOURCE_BOX)), as_image(_box_mask(size, TARGET_BOX)))]
        )
    elif setup.mask == "auto":
        masks = MaskConfig(source_word=MASK_WORD, target_word=MASK_WORD, threshold=MASK_THRESHOLD)
    result = engine.edit(
        image,
        [TARGET_PROMPT],
        source_prompt=setup.source_prompt,
        steps=steps,
        guidance_scale=GUIDANCE,
        control=ControlConfig(start_step=start_step, start_layer=setup.family.start_layer),
        width=image.width,
        height=image.height,
        progress=progress,
        masks=masks,
        inversion_guidance_scale=inversion_guidance,
        condition=None
        if controlnet is None
        else Condition(ConditionModel(controlnet, "controlnet", "sd"), [condition_image]),
    )
    return result.stats.unet_image_evals, result.stats.condition_evals, result.latents


def check_agreement() -> float:
    """Both procedures on the tiny checkpoints' components: same edit, up to float error.

    Returns the worst difference relative to the latents' scale (at least 1).

    Guidance between identical empty prompts is the identity, so the reference's guided
    inversion and batch of four must give our images; with automatic masks the source prompt
    names the object, so ours inverts with the reference's guidance for the comparison. This
    shows the re-creation is faithful, for SD (unmasked, manual and automatic masks) and SDXL.
    """
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0
    from PIL import Image

    from masactrl_core.canny import canny
    from masactrl_core.tiny import build_sd_pipeline, build_sdxl_pipeline
    from masactrl_core.tiny_conditions import build_tiny_condition_model

    worst = 0.0
    tiny = {
        "sd": Family("sd", "SD1.5", {}, 64, 10, "float32"),
        "sdxl": Family("sdxl", "SDXL", {}, 64, 44, "float32"),
    }
    cases = [
        ("sd", "none", "none"),
        ("sd", "manual", "none"),
        ("sd", "auto", "none"),
        ("sdxl", "none", "none"),
        ("sd", "none", "controlnet"),
    ]
    for family, mask, kind in cases:
        setup = Setup(tiny[family], mask, kind)
        pipe = build_sd_pipeline(0) if family == "sd" else build_sdxl_pipeline(0)
        generator = torch.Generator("cpu").manual_seed(0)
        pixels = torch.randint(0, 256, (64, 64, 3), generator=generator).to(torch.uint8)
        image = Image.fromarray(pixels.numpy())
        timer = UNetTimer(lambda: None, verbose=False)
        guidance = GUIDANCE if mask == "auto" else 1.0
        condition: dict[str, Any] = {}
        if kind == "controlnet":
            # Seeded output convolutions: a zero ControlNet would agree vacuously.
            controlnet = build_tiny_condition_model("controlnet", pipe.unet, "sd", seed=0)
            condition = {"controlnet": controlnet.eval(), "condition_image": canny(image)}
        with torch.inference_mode():
            _, _, reference = reference_edit(pipe, image, 6, 1, timer, setup, **condition)
        # The engine keeps whatever processors it finds outside its controlled layers.
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        _, _, ours = ours_edit(
            pipe, image, 6, 1, timer, setup, **condition, inversion_guidance=guidance
        )
        _, _, uncontrolled = ours_edit(
            pipe, image, 6, 6, timer, setup, **condition, inversion_guidance=guidance
        )
        difference = (reference.float().cpu() - ours).abs().max().item()
        effect = (ours - uncontrolled).abs().max().item()
        # Float error scales with the latents (the tiny SDXL's reach ~13): compare relatively.
        worst = max(worst, difference / max(1.0, ours.abs().max().item()))
        print(
            f"{family:4} masks {mask:6} condition {kind:10}: "
            f"max |reference - ours| = {difference:.2e} "
            f"(the control itself changes {effect:.2f}; latents up to "
            f"{ours.abs().max().item():.1f})"
        )
    return worst


SEQUENCE_SOURCE_PROMPT = "a photo of a cat"  # differs from the negative prompt: 2 + 2K rows


def sequence_frames(count: int, size: int) -> list[Any]:
    """``count`` canny edge maps of seeded random pictures: a stand-in pose or edge sequence."""
    import torch
    from PIL import Image

    from masactrl_core.canny import canny

    frames = []
    for k in range(count):
        generator = torch.Generator("cpu").manual_seed(100 + k)
        blocks = torch.randint(0, 256, (8, 8, 3), generator=generator).to(torch.uint8).numpy()
        picture = Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST)
        frames.append(canny(picture))
    return frames


def reference_sequence(
    pipe: Any,
    frames: list[Any],
    steps: int,
    start_step: int,
    timer: UNetTimer,
    setup: Setup,
    controlnet: Any,
) -> tuple[int, int, list[Any]]:
    """The authors' sequence script: one full [source, target] synthesis per condition frame.

    Every frame starts from the same seeded noise. Returns the UNet and ControlNet
    image-evaluations and each frame's final [source, target] latents.
    """
    import torch

    size = frames[0].width
    side = size // pipe.vae_scale_factor
    # The engine's seed contract: float32 CPU noise, then the device and dtype.
    shape = (1, pipe.unet.config.in_channels, side, side)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(0))
    noise = noise.to(pipe.unet.device, pipe.unet.dtype)
    evals = condition_evals = 0
    results = []
    for frame in frames:
        frame_evals, frame_condition_evals, latents = reference_denoise(
            pipe, noise, steps, start_step, timer, setup, SEQUENCE_SOURCE_PROMPT, controlnet,
            frame, image_size=size,
        )  # fmt: skip
        evals += frame_evals
        condition_evals += frame_condition_evals
        results.append(latents)
    return evals, condition_evals, results


def ours_sequence(
    pipe: Any,
    frames: list[Any],
    steps: int,
    start_step: int,
    timer: UNetTimer,
    setup: Setup,
    controlnet: Any,
    max_batch: int = 16,
) -> tuple[int, int, Any]:
    """MasaCtrlEngine.sequence: one source branch per step for every frame, chunked."""
    from masactrl_core import Condition, ControlConfig, EngineOptions, MasaCtrlEngine
    from masactrl_core.conditions import ConditionModel

    engine = MasaCtrlEngine(
        pipe, family=setup.family.name, options=EngineOptions(max_batch=max_batch)
    )

    def progress(phase: str, step: int, total: int) -> None:
        timer.mark(phase, step - 1, step - 1 >= start_step)

    size = frames[0].width
    result = engine.sequence(
        SEQUENCE_SOURCE_PROMPT,
        TARGET_PROMPT,
        Condition(ConditionModel(controlnet, "controlnet", "sd"), frames),
        seed=0,
        steps=steps,
        guidance_scale=GUIDANCE,
        control=ControlConfig(start_step=start_step, start_layer=setup.family.start_layer),
        width=size,
        height=size,
        progress=progress,
    )
    return result.stats.unet_image_evals, result.stats.condition_evals, result.latents


def check_sequence_agreement() -> float:
    """The per-frame loop and the engine's sequence on tiny SD components, chunked.

    Returns the worst difference relative to the latents' scale (at least 1); exits if the
    evaluation counts miss the formulas.
    """
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from masactrl_core.tiny import build_sd_pipeline
    from masactrl_core.tiny_conditions import build_tiny_condition_model

    count, steps = 2, 3  # the smallest run with chunks that split a frame's guidance halves
    setup = Setup(Family("sd", "SD1.5", {}, 64, 10, "float32"), "none", "controlnet")
    pipe = build_sd_pipeline(0)
    controlnet = build_tiny_condition_model("controlnet", pipe.unet, "sd", seed=0).eval()
    frames = sequence_frames(count, 64)
    timer = UNetTimer(lambda: None, verbose=False)
    with torch.inference_mode():
        ref_evals, ref_condition_evals, reference = reference_sequence(
            pipe, frames, steps, 1, timer, setup, controlnet
        )
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    # max_batch 3 splits the 2 + 2K = 6 rows of a step into two chunks.
    evals, condition_evals, ours = ours_sequence(
        pipe, frames, steps, 1, timer, setup, controlnet, max_batch=3
    )
    expected = {
        "reference UNet": (ref_evals, count * steps * 4),
        "reference ControlNet": (ref_condition_evals, count * steps * 4),
        "ours UNet": (evals, steps * (2 + 2 * count)),
        "ours ControlNet": (condition_evals, steps * 2 * count),
    }
    for name, (got, formula) in expected.items():
        if got != formula:
            sys.exit(f"{name} evaluations {got} differ from the formula's {formula}")
    difference = max(
        (latents.float().cpu() - ours[[0, k + 1]]).abs().max().item()
        for k, latents in enumerate(reference)
    )
    print(
        f"sd   sequence of {count} frames, max_batch 3: max |reference - ours| = "
        f"{difference:.2e} (UNet images {ref_evals} vs {evals}, ControlNet {ref_condition_evals} "
        f"vs {condition_evals})"
    )
    return difference / max(1.0, ours.abs().max().item())


# --- one variant per process -----------------------------------------------------------------


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, run the short edit once, return timings and memory (in the child)."""
    import torch
    from PIL import Image

    from masactrl_core.tiny import build_sd_pipeline, build_sdxl_pipeline

    setup = Setup(FAMILIES[args.family], args.mask, args.condition)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    # Weights are initialized directly in the run's dtype: SDXL's 2.6 B float32 parameters would
    # otherwise need 10 GiB before the cast.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else default_dtype)
    try:
        if args.family == "sd":
            pipe = build_sd_pipeline(
                0,
                unet_config=SD15_UNET_CONFIG,
                vae_config=STAND_IN_VAE_CONFIG,
                text_config=STAND_IN_TEXT_CONFIG,
            )
        else:
            pipe = build_sdxl_pipeline(
                0,
                unet_config=SDXL_UNET_CONFIG,
                vae_config=STAND_IN_VAE_CONFIG,
                text_config=STAND_IN_TEXT_CONFIG,
                text_config_2=STAND_IN_TEXT_CONFIG_2,
            )
        controlnet = None
        if setup.condition == "controlnet":
            from diffusers import ControlNetModel

            # SD1.5 ControlNets (lllyasviel/control_v11p_sd15_*) have exactly this architecture.
            torch.manual_seed(0)
            controlnet = ControlNetModel.from_unet(pipe.unet, load_weights_from_unet=False)
            controlnet.to(device, dtype)
    finally:
        torch.set_default_dtype(default_dtype)
    pipe.to(device, dtype)
    modules = [pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    modules.append(controlnet)
    for module in filter(None, modules):
        module.eval().requires_grad_(False)
    build_seconds = time.perf_counter() - started
    print(
        f"[{variant}] built {setup.family.label} UNet in {build_seconds:.0f} s",
        file=sys.stderr,
        flush=True,
    )

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    timer = UNetTimer(sync)
    timer.attach(pipe.unet)
    generator = torch.Generator("cpu").manual_seed(0)
    pixels = torch.randint(0, 256, (args.size, args.size, 3), generator=generator)
    image = Image.fromarray(pixels.to(torch.uint8).numpy())
    condition: dict[str, Any] = {}
    if controlnet is not None:
        from masactrl_core.canny import canny

        timer.companion = UNetTimer(sync, verbose=False)
        timer.companion.attach(controlnet)
        condition = {"controlnet": controlnet, "condition_image": canny(image)}
    total = 2 * args.steps
    peak = CudaPeak(device) if device.type == "cuda" else CpuPeak()
    if args.sequence:
        frames = sequence_frames(args.sequence, args.size)
        run = reference_sequence if variant == "reference" else ours_sequence
        if variant == "reference":
            # Every frame of the per-frame loop is the same run on another edge map: time one
            # and count it K times in the table (the same steps, images and peak memory).
            frames = frames[:1]
        with peak, torch.inference_mode():
            evals, condition_evals, _ = run(
                pipe, frames, total, args.steps, timer, setup, condition["controlnet"]
            )
    else:
        edit = reference_edit if variant == "reference" else ours_edit
        with peak, torch.inference_mode():
            evals, condition_evals, _ = edit(
                pipe, image, total, args.steps, timer, setup, **condition
            )
    return {
        "variant": variant,
        "steps": timer.steps,
        "condition_steps": timer.companion.steps if timer.companion else [],
        "unet_image_evals": evals,
        "condition_evals": condition_evals,
        "baseline_bytes": peak.baseline,
        "peak_bytes": peak.peak,
        "memory_method": peak.method,
        "build_seconds": build_seconds,
    }


def _spawn(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--child", variant]
    command += ["--device", args.device, "--dtype", args.dtype]
    command += ["--steps", str(args.steps), "--size", str(args.size)]
    command += ["--family", args.family, "--mask", args.mask, "--condition", args.condition]
    command += ["--sequence", str(args.sequence or 0)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"the {variant} run failed with status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- report ----------------------------------------------------------------------------------


KINDS = ("invert", "denoise", "controlled")


@dataclass
class Summary:
    """One variant's per-step times (least-disturbed sample of each kind) and memory."""

    wall: dict[str, float]
    cpu: dict[str, float]
    images: dict[str, int]
    peak: int
    increase: int
    # The ControlNet's evaluations and seconds per step, by kind (empty without a condition).
    condition_images: dict[str, float | int] = field(default_factory=dict)
    condition_wall: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def per_edit(per_step: Mapping[str, float]) -> float:
        """A 50-step edit: 50 inversion steps, 4 plain and 46 controlled denoising steps."""
        return (
            EDIT_STEPS * per_step["invert"]
            + PAPER_START_STEP * per_step["denoise"]
            + (EDIT_STEPS - PAPER_START_STEP) * per_step["controlled"]
        )


def _by_kind(steps: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for step in steps:
        kind = "controlled" if step["controlled"] else step["phase"]
        groups[kind].append(step)
    return groups


def summarize(run: dict[str, Any]) -> Summary:
    groups = _by_kind(run["steps"])
    conditions = _by_kind(run.get("condition_steps", []))
    # The minimum is the sample least disturbed by other work on the machine (as timeit advises).
    return Summary(
        wall={k: min(s["seconds"] for s in steps) for k, steps in groups.items()},
        cpu={k: min(s["cpu_seconds"] for s in steps) for k, steps in groups.items()},
        images={k: steps[0]["images"] for k, steps in groups.items()},
        peak=run["peak_bytes"],
        increase=run["peak_bytes"] - run["baseline_bytes"],
        condition_images={k: steps[0]["images"] for k, steps in conditions.items() if steps},
        condition_wall={
            k: min(s["seconds"] for s in steps) for k, steps in conditions.items() if steps
        },
    )


def machine() -> str:
    import diffusers
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = (
        f"CPU {cpu}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    text += f", diffusers {diffusers.__version__}, Python {platform.python_version()}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(ref: Summary, ours: Summary, args: argparse.Namespace, memory_method: str) -> str:
    """The Markdown table and the verdicts."""
    rows: list[tuple[str, str, str, float | None]] = []

    def add(label: str, r: float, o: float, fmt: Callable[[float], str]) -> None:
        rows.append((label, fmt(r), fmt(o), o / r if r else None))

    def seconds(x: float) -> str:
        return f"{x:.2f}"

    add(
        "UNet image-evaluations per 50-step edit",
        Summary.per_edit(ref.images),
        Summary.per_edit(ours.images),
        str,
    )
    for kind, label in (
        ("invert", "inversion step"),
        ("denoise", "denoising step, before control starts"),
        ("controlled", "denoising step, controlled"),
    ):
        rows.append(
            (f"UNet images per {label}", str(ref.images[kind]), str(ours.images[kind]), None)
        )
        add(f"s per {label}", ref.wall[kind], ours.wall[kind], seconds)
    add(
        "**s per 50-step edit** (extrapolated)",
        ref.per_edit(ref.wall),
        ours.per_edit(ours.wall),
        seconds,
    )
    add(
        "CPU-s per 50-step edit (all threads)",
        ref.per_edit(ref.cpu),
        ours.per_edit(ours.cpu),
        seconds,
    )
    if ref.condition_images:
        add(
            "ControlNet evaluations per 50-step edit",
            Summary.per_edit(ref.condition_images),
            Summary.per_edit(ours.condition_images),
            str,
        )
        add(
            "ControlNet s per controlled denoising step",
            ref.condition_wall["controlled"],
            ours.condition_wall["controlled"],
            seconds,
        )
        add(
            "**s per 50-step edit with the ControlNet** (extrapolated)",
            ref.per_edit(ref.wall) + ref.per_edit(ref.condition_wall),
            ours.per_edit(ours.wall) + ours.per_edit(ours.condition_wall),
            seconds,
        )
    add("**peak memory per edit** (absolute)", ref.peak, ours.peak, _gib)
    add("peak memory increase over the loaded model", ref.increase, ours.increase, _gib)

    size = f"{args.size}x{args.size}"
    what = FAMILIES[args.family].label + ("" if args.mask == "none" else f", {args.mask} masks")
    what += "" if args.condition == "none" else f", {args.condition}"
    lines = [
        f"| single-target edit, {what}, {size}, {args.device} {args.dtype} "
        "| reference | ours | ours/ref |"
    ]
    lines.append("|---|---:|---:|---:|")
    for label, r, o, ratio in rows:
        lines.append(f"| {label} | {r} | {o} | {'' if ratio is None else f'{ratio:.2f}'} |")

    time_ratio = ours.per_edit(ours.wall) / ref.per_edit(ref.wall)
    peak_ratio, increase_ratio = ours.peak / ref.peak, ours.increase / ref.increase
    met_time = time_ratio <= TIME_TARGET
    met_memory = peak_ratio <= MEMORY_TARGET and increase_ratio <= MEMORY_TARGET
    lines += [
        "",
        f"time target, ours <= {TIME_TARGET}x the reference per edit: {time_ratio:.2f}x -> "
        + ("MET" if met_time else "NOT MET"),
        f"memory target, ours <= {MEMORY_TARGET}x the reference's peak (absolute, increase): "
        f"{peak_ratio:.2f}x, {increase_ratio:.2f}x -> " + ("MET" if met_memory else "NOT MET"),
        f"measured: a {2 * args.steps}-step edit per variant, each in its own process; "
        f"memory via {memory_method}",
    ]
    return "\n".join(lines)


def sequence_report(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """The Markdown table for ``--sequence K``: a 50-step synthesis sequence of K frames.

    The reference's steps are per frame (K runs of 50 steps); ours serve every frame per step.
    """
    count = args.sequence

    def per_sequence(run: dict[str, Any], key: str, value: str) -> float:
        groups = _by_kind(run[key])
        best = {k: min(s[value] for s in steps) for k, steps in groups.items() if steps}
        total = (
            PAPER_START_STEP * best["denoise"]
            + (EDIT_STEPS - PAPER_START_STEP) * best["controlled"]
        )
        return total * (count if run["variant"] == "reference" else 1)

    ref, ours = runs["reference"], runs["ours"]
    rows: list[tuple[str, float, float, Callable[[Any], str]]] = [
        ("UNet image-evaluations", per_sequence(ref, "steps", "images"),
         per_sequence(ours, "steps", "images"), str),
        ("ControlNet image-evaluations", per_sequence(ref, "condition_steps", "images"),
         per_sequence(ours, "condition_steps", "images"), str),
        ("s in the UNet", per_sequence(ref, "steps", "seconds"),
         per_sequence(ours, "steps", "seconds"), lambda x: f"{x:.1f}"),
        ("s in the ControlNet", per_sequence(ref, "condition_steps", "seconds"),
         per_sequence(ours, "condition_steps", "seconds"), lambda x: f"{x:.1f}"),
        ("**peak memory** (absolute)", ref["peak_bytes"], ours["peak_bytes"], _gib),
        ("peak memory increase over the loaded model",
         ref["peak_bytes"] - ref["baseline_bytes"], ours["peak_bytes"] - ours["baseline_bytes"],
         _gib),
    ]  # fmt: skip
    lines = [
        f"| {EDIT_STEPS}-step synthesis sequence of {count} frames, SD1.5 + ControlNet, "
        f"{args.size}x{args.size}, {args.device} {args.dtype} "
        "| per-frame loop | ours | ours/ref |",
        "|---|---:|---:|---:|",
    ]
    for label, r, o, fmt in rows:
        ratio = f"{o / r:.2f}" if r else ""
        lines.append(f"| {label} | {fmt(round(r) if fmt is str else r)} | "
                     f"{fmt(round(o) if fmt is str else o)} | {ratio} |")  # fmt: skip
    lines += [
        "",
        f"formulas: loop K x S x 4 UNet and ControlNet images; ours S x (2 + 2K) UNet and "
        f"S x 2K ControlNet images (K = {count}, S = {EDIT_STEPS})",
        f"measured: {2 * args.steps} steps per frame (loop) or per sequence (ours), control from "
        f"step {args.steps}, each variant in its own process; extrapolated to {EDIT_STEPS} steps "
        f"with control from step {PAPER_START_STEP}; memory via {ours['memory_method']}",
    ]
    return "\n".join(lines)


# The multimodal diffusion transformers have their own benchmark (bench/mmdit.py): no authors'
# procedure exists for them, so they are measured against the per-target loop instead.
MMDIT_FAMILIES = ("flux", "sd3")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--family")
    if peek.parse_known_args(argv)[0].family in MMDIT_FAMILIES:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench import mmdit

        return mmdit.main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    parser.add_argument(
        "--steps",
        type=int,
        default=1,
        help="timed steps of each kind: inversion, denoising before and after the control "
        "starts (the measured edit has 2 x STEPS steps; default 1)",
    )
    parser.add_argument(
        "--family",
        default="sd",
        choices=(*FAMILIES, *MMDIT_FAMILIES),
        help="UNet architecture (default sd); flux and sd3 run bench/mmdit.py (see its --help)",
    )
    parser.add_argument(
        "--mask",
        default="none",
        choices=("none", "manual", "auto"),
        help="mask-guided variants: manual region masks or automatic word masks (default none)",
    )
    parser.add_argument(
        "--condition",
        default="none",
        choices=("none", "controlnet"),
        help="layout guidance: an SD1.5 ControlNet on a canny edge map (default none)",
    )
    parser.add_argument(
        "--sequence",
        type=int,
        nargs="?",
        const=8,
        default=0,
        metavar="K",
        help="a synthesis sequence of K condition frames (default 8) with an SD1.5 ControlNet, "
        "against the authors' per-frame loop",
    )
    parser.add_argument("--size", type=int, help="image size (default: 512 for sd, 1024 for sdxl)")
    parser.add_argument("--json", help="also write the raw measurements to this file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check that the re-created reference and ours give the same edit (seconds)",
    )
    parser.add_argument("--child", choices=("reference", "ours"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Library advisories (dtype casts, torchvision) are noise next to the table.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # Run from a checkout without installing: masactrl_core lives next to bench/.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    family = FAMILIES[args.family]
    args.size = args.size or family.size
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else family.cpu_dtype)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.sequence < 0:
        parser.error("--sequence must be a positive number of frames")
    if args.sequence:
        args.condition = "controlnet"  # a sequence's frames are ControlNet conditions
    if args.condition != "none" and (args.family, args.mask) != ("sd", "none"):
        parser.error("--condition controlnet runs with --family sd and without masks")

    if args.check:
        worst = max(check_agreement(), check_sequence_agreement())
        return 0 if worst < 1e-3 else 1
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return 0

    print(machine(), flush=True)
    started = time.perf_counter()
    runs = {variant: _spawn(variant, args) for variant in ("reference", "ours")}
    if args.sequence:
        print(sequence_report(runs, args))
    else:
        ref, ours = summarize(runs["reference"]), summarize(runs["ours"])
        print(report(ref, ours, args, runs["ours"]["memory_method"]))
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine(), "args": vars(args), "runs": runs}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
