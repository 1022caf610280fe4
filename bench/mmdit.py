"""Benchmark: MasaCtrl editing on an MM-DiT (FLUX.1, SD3) against the per-target loop.

``python bench/core.py --family flux|sd3`` lands here. A real-image edit on a transformer of the
family's **real width** (FLUX.1 [dev]: 24 heads of 128, T5 width 4096, CLIP pooled 768; SD3
Medium: 24 heads of 64, pooled 2048) and **reduced depth** (``--double``/``--single`` FLUX
blocks, ``--blocks`` SD3 joint blocks), with seeded random weights, nothing downloaded. The text
encoders and the VAE are narrow stand-ins that only produce the right shapes (the transformer is
what is measured); the tokenizers and the scheduler config are the tiny checkpoints' (FLUX.1
[dev]'s dynamic shift).

Two variants, each in its own subprocess for clean peak-memory accounting, both through the
engine's public calls:

* **ours** -- one ``MasaCtrlEngine.edit`` of the photo to N targets: the inversion (S images, one
  row per step; the kept trajectory), then the source and the N targets denoised together. Rows
  per step: ``1 + N`` on FLUX (guidance-distilled, the scale is an input), ``2(1 + N)`` on SD3
  (classifier-free guidance halves). A single-target FLUX edit is ``S + 2S`` images.
* **loop** -- the per-target loop: one edit per target, each inverting the photo again and
  running the source again beside its target (FLUX: ``N(S + 2S)``; SD3: ``N(S + 4S)``).

Evaluations are the engine's own count (``RunStats.unet_image_evals``: transformer images),
seconds its inversion and denoising times, peak memory the process's high-water mark (CPU:
``VmHWM``; CUDA: ``max_memory_allocated``) over the edit, weights included.

    python bench/core.py --family flux                     # CPU float32, 256 px, 2 steps, N=2
    python bench/core.py --family flux --targets 1 --steps 4
    python bench/core.py --family flux --device cuda --dtype bfloat16 --size 1024 \\
        --double 19 --single 38 --max-sequence-length 512   # the full FLUX.1 [dev] shape
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.core import CpuPeak, CudaPeak, machine  # noqa: E402 (needs the path above)

# black-forest-labs/FLUX.1-dev's transformer/config.json, depth set per run.
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
# stabilityai/stable-diffusion-3-medium-diffusers' transformer/config.json, depth set per run.
SD3_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}
# A 16-channel VAE of factor 8 (four levels), narrow: FLUX's and SD3's latent shape.
STAND_IN_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}


def _clip(tokenizer: Any, width: int, projection: int | None) -> Any:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=64,
        num_attention_heads=1,
        num_hidden_layers=1,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection or width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def _t5(tokenizer: Any) -> Any:
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=4096,
        d_kv=64,
        d_ff=64,
        num_layers=1,
        num_heads=1,
    )
    torch.manual_seed(2)
    return T5EncoderModel(config).eval()


def build_pipeline(args: argparse.Namespace) -> Any:
    """The family's pipeline: real-width transformer of reduced depth, stand-in encoders/VAE."""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    from masactrl_core.tiny_mmdit import build_flux_pipeline, build_sd3_pipeline

    torch.manual_seed(0)
    if args.family == "flux":
        from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        tiny = build_flux_pipeline(0)
        tiny.tokenizer_2.model_max_length = args.max_sequence_length
        transformer = FluxTransformer2DModel(
            **{**FLUX_DEV_TRANSFORMER, "num_layers": args.double, "num_single_layers": args.single}
        )
        return FluxPipeline(
            scheduler=tiny.scheduler,
            vae=AutoencoderKL(**STAND_IN_VAE, **FLUX_VAE_FACTORS),
            text_encoder=_clip(tiny.tokenizer, 768, None),
            tokenizer=tiny.tokenizer,
            text_encoder_2=_t5(tiny.tokenizer_2),
            tokenizer_2=tiny.tokenizer_2,
            transformer=transformer,
        )
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        StableDiffusion3Pipeline,
    )

    tiny = build_sd3_pipeline(0)
    tiny.tokenizer_3.model_max_length = args.max_sequence_length
    transformer = SD3Transformer2DModel(**{**SD3_MEDIUM_TRANSFORMER, "num_layers": args.blocks})
    return StableDiffusion3Pipeline(
        scheduler=tiny.scheduler,
        vae=AutoencoderKL(**STAND_IN_VAE, **SD3_VAE_FACTORS),
        # CLIP-L and CLIP-G: pooled 768 + 1280 = 2048, hidden 768 + 1280 padded to T5's 4096.
        text_encoder=_clip(tiny.tokenizer, 768, 768),
        tokenizer=tiny.tokenizer,
        text_encoder_2=_clip(tiny.tokenizer_2, 1280, 1280),
        tokenizer_2=tiny.tokenizer_2,
        text_encoder_3=_t5(tiny.tokenizer_3),
        tokenizer_3=tiny.tokenizer_3,
        transformer=transformer,
    )


def _photo(size: int) -> Any:
    from PIL import Image

    image = Image.new("RGB", (size, size), (90, 120, 160))
    image.paste((220, 180, 40), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One variant's edit in this process: evaluations, seconds, peak memory."""
    import torch

    from masactrl_core import ControlConfig, MasaCtrlEngine

    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    built = time.perf_counter()
    pipeline = build_pipeline(args).to(device=device, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    engine = MasaCtrlEngine(pipeline, family=args.family, model_name=f"bench-{args.family}")
    build_seconds = time.perf_counter() - built
    targets = [f"a photo of a {word}" for word in ("dog", "car", "tree", "house")][: args.targets]
    photo = _photo(args.size)
    # FLUX.1 [dev] is used at guidance 3.5 (an input of the model); SD3 at 7.0.
    options: dict[str, Any] = {
        "source_prompt": "a photo of a cat",
        "steps": args.steps,
        "guidance_scale": 3.5 if args.family == "flux" else 7.0,
        "width": args.size,
        "height": args.size,
        "control": ControlConfig(start_step=0, start_layer=engine.default_control.start_layer),
    }
    # Kernel selection and first-call allocations are paid here, outside the measurement.
    side = engine.size_multiple * 2
    engine.synthesize("warm-up", ["warm-up"], seed=0, steps=1, width=side, height=side)
    edits = [targets] if variant == "ours" else [[target] for target in targets]
    peak = CudaPeak(device) if device.type == "cuda" else CpuPeak()
    evals, inversion, denoise = 0, 0.0, 0.0
    started = time.perf_counter()
    with peak, torch.inference_mode():
        for prompts in edits:
            result = engine.edit(photo, prompts, **options)
            evals += result.stats.unet_image_evals
            inversion += result.stats.inversion_seconds
            denoise += result.stats.denoise_seconds
    return {
        "variant": variant,
        "evals": evals,
        "inversion_seconds": inversion,
        "denoise_seconds": denoise,
        "seconds": time.perf_counter() - started,
        "build_seconds": build_seconds,
        "peak_bytes": peak.peak,
        "baseline_bytes": peak.baseline,
        "memory_method": peak.method,
        "block_count": engine.block_count,
        "parameters": sum(p.numel() for p in pipeline.transformer.parameters()),
    }


def _spawn(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--child", variant]
    for name in ("family", "device", "dtype", "size", "steps", "targets"):
        command += [f"--{name}", str(getattr(args, name))]
    command += ["--double", str(args.double), "--single", str(args.single)]
    command += ["--blocks", str(args.blocks)]
    command += ["--max-sequence-length", str(args.max_sequence_length)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"the {variant} run failed with status {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def expected_evals(family: str, steps: int, targets: int) -> dict[str, int]:
    """The evaluation counts the rows imply (the report checks the measured ones against them)."""
    per_row = 1 if family == "flux" else 2  # classifier-free guidance halves on SD3
    return {
        "ours": steps + per_row * (1 + targets) * steps,
        "loop": targets * (steps + per_row * 2 * steps),
    }


def report(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    ours, loop = runs["ours"], runs["loop"]
    expected = expected_evals(args.family, args.steps, args.targets)
    shape = (
        f"{args.double} double + {args.single} single blocks"
        if args.family == "flux"
        else f"{args.blocks} joint blocks"
    )
    lines = [
        f"{args.family}: real width, {shape} ({ours['parameters'] / 1e9:.2f} B transformer "
        f"parameters), {args.size}x{args.size} px, {args.max_sequence_length} T5 tokens, "
        f"{args.steps} steps, {args.targets} target(s), {args.device} {args.dtype}",
        "",
        "| | ours (one edit, N targets) | per-target loop | loop / ours |",
        "|---|---|---|---|",
    ]

    def row(name: str, a: float, b: float, show: Any) -> None:
        lines.append(f"| {name} | {show(a)} | {show(b)} | {b / a:.2f}x |")

    row("transformer images", ours["evals"], loop["evals"], lambda v: f"{v:.0f}")
    row("seconds (inversion + denoising)", ours["seconds"], loop["seconds"], lambda v: f"{v:.1f}")
    row("peak memory (absolute)", ours["peak_bytes"], loop["peak_bytes"], _gib)
    lines.append("")
    lines.append(
        f"expected images: ours {expected['ours']}, loop {expected['loop']}; measured "
        f"{ours['evals']}, {loop['evals']}"
        + (" (agree)" if (ours["evals"], loop["evals"]) == tuple(expected.values()) else "")
    )
    lines.append(f"peak memory method: {ours['memory_method']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=("flux", "sd3"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (256)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps S (default 2)")
    parser.add_argument("--targets", type=int, default=2, help="target prompts N (default 2)")
    parser.add_argument("--double", type=int, default=1, help="FLUX double-stream blocks (1)")
    parser.add_argument("--single", type=int, default=1, help="FLUX single-stream blocks (1)")
    parser.add_argument("--blocks", type=int, default=2, help="SD3 joint blocks (default 2)")
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        default=128,
        help="T5 tokens per prompt (default 128; the real models use 512 (FLUX.1 [dev]), 256 "
        "([schnell]) or 77+ (SD3))",
    )
    parser.add_argument("--json", help="also write the raw measurements to this file")
    parser.add_argument("--child", choices=("ours", "loop"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if min(args.steps, args.targets, args.double, args.blocks) < 1 or args.single < 0:
        parser.error("--steps, --targets, --double and --blocks must be at least 1")
    if args.family == "sd3":
        from masactrl_core.backbones import BACKBONES

        if "sd3" not in BACKBONES:
            parser.error("this engine has no SD3 backbone yet (masactrl_core.backbones)")
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return 0

    print(machine(), flush=True)
    started = time.perf_counter()
    runs = {variant: _spawn(variant, args) for variant in ("ours", "loop")}
    print(report(runs, args))
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine(), "args": vars(args), "runs": runs}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
