"""Benchmark for a lent GPU: MasaCtrl's edit and synthesis against plain diffusers generation.

What a user of the method asks first is what the control costs next to the generation they
already run. For SD1.5 (512x512) and SDXL (1024x1024) this script times, in float16 on CUDA:

* plain -- diffusers' own ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` with a DDIM
  scheduler: one image, 50 steps, classifier-free guidance 7.5 (2 UNet images per step);
* edit -- ``MasaCtrlEngine.edit``: a real image (seeded noise pixels) inverted and denoised with
  one target prompt under mutual self-attention (the paper's start step 4, and its start layer
  10 of 16 kept at the same depth of the UNet);
* synthesis -- ``MasaCtrlEngine.synthesize``: a source prompt and four target prompts from one
  noise, under the same control.

Each run is timed end to end (prompt encoding, VAE, sampling, decoding to PIL), CUDA-synchronised
before and after, once after an untimed two-step warm-up of the same run (kernel selection and
allocator growth then happen outside the timing). Per run the script records the UNet image
evaluations (counted by a forward pre-hook on the UNet, rows of each call; the engine's own
``stats.unet_image_evals`` beside it), the seconds, the CUDA peak
(``torch.cuda.max_memory_allocated``, reset before each run: weights included) and the memory held
by the loaded model. The goal is an edit costing at most 2.1x a plain generation in seconds.

The models are full-size architectures from their configs with seeded random weights (nothing is
downloaded): SD1.5's UNet, VAE and CLIP ViT-L text encoder; SDXL's UNet, VAE, CLIP ViT-L and
OpenCLIP ViT-bigG encoders. The UNet configs are bench/core.py's; tokenizers are written locally
by ``masactrl_core.tiny`` and the encoders' token tables are resized to CLIP's 49,408 rows, so
weights and memory are the real models'. Parameters are created directly on the device in the
run's dtype: SDXL's 2.6 B parameters need no CPU initialisation or copy.

``--families flux`` adds the FLUX.1 [dev]-shaped run: its 12 B transformer (19 double- and 38
single-stream blocks), T5-XXL, CLIP-L and its 16-channel VAE from their configs, in bfloat16
(about 33 GiB of weights: it fits an 80 GB card whole; see the README's memory plan for smaller
ones), 1024x1024. The plain run is diffusers' ``FluxPipeline`` with its own flow-matching
scheduler at guidance 3.5 (a model input: one transformer image per step), the edit and the
synthesis the engine's (rows ``1 + N`` per step: an edit is ``S + 2S`` images, a plain
generation ``S``, so the edit's floor is 3x, not 2x).

``--tiny`` is the same script on the tiny SD, SDXL and FLUX checkpoints' components
(``masactrl_core.tiny``, ``tiny_mmdit``), 64x64 px, on the CPU in float32 and a few steps: the
test suite runs it, so the script is known to work before a GPU exists. Its seconds say nothing
about a GPU.

The JSON and the Markdown table are written to ``--out`` after each family, so a run stopped by a
time limit keeps what it finished. Expected on one H100 (an estimate from published SD1.5/SDXL
float16 step times; no GPU has run it yet): SD1.5's three runs ~10 s, SDXL's ~40 s (its 5-image
synthesis at 1024 px the longest, ~25 s), warm-ups ~5 s, building ~15 s, imports and CUDA start
~20 s: about 1.5-2 minutes, under 8 even at three times that. The elapsed time is printed as it
goes.

    python bench/gpu.py                          # cuda float16, both families, 50 steps
    python bench/gpu.py --families sdxl --out out/gpu-sdxl
    python bench/gpu.py --families flux --dtype bfloat16 --out out/gpu-flux
    python bench/gpu.py --tiny                   # CPU float32, tiny models (the test suite)
    python bench/gpu.py --tiny --dtype float16   # the float16 path, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run from a checkout without installing: masactrl_core and bench/core.py live here.
sys.path.insert(0, str(REPO))

from bench.core import SD15_UNET_CONFIG, SDXL_UNET_CONFIG  # noqa: E402 (needs the path above)
from bench.core import machine as describe_machine  # noqa: E402

STEPS = 50  # the paper's sampling steps, and a usual generation's
TINY_STEPS = 5  # the control (from step 4) runs on the last step
WARMUP_STEPS = 2
GUIDANCE = 7.5
PAPER_START_STEP = 4
GOAL = 2.1  # edit seconds / plain generation seconds
PROMPT = "a photo of a running cat"  # the plain generation's prompt and the edit's target
SOURCE_PROMPT = "a photo of a cat"  # the synthesis's source
SYNTHESIS_TARGETS = (
    "a photo of a running cat",
    "a photo of a cat jumping in the snow",
    "a photo of a cat sitting on the beach",
    "a photo of a cat raising its paw",
)

# openai/clip-vit-large-patch14's text model: SD1.5's encoder and SDXL's first.
CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}
# laion/CLIP-ViT-bigG-14's text model: SDXL's second encoder (text_encoder_2), with projection.
OPENCLIP_BIGG_TEXT_CONFIG: dict[str, Any] = {
    **CLIP_L_TEXT_CONFIG,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
CLIP_VOCAB_SIZE = 49408
# stable-diffusion-v1-5's vae/config.json; SDXL's differs in size, scaling and the fp16 upcast.
SD15_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SDXL_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


# FLUX.1 [dev]: guidance is an input of the model (its card's default), no classifier-free rows.
FLUX_GUIDANCE = 3.5
# google/t5-v1_1-xxl's encoder: FLUX.1's text_encoder_2.
T5_XXL_CONFIG: dict[str, Any] = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "vocab_size": 32128,
    "relative_attention_num_buckets": 32,
    "is_encoder_decoder": False,
}
# black-forest-labs/FLUX.1-dev's vae/config.json.
FLUX_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


# --- models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """One benchmarked model: the engine's family, its label, image size and how to build it."""

    family: str
    label: str
    size: int
    build: Callable[[], Any]  # a seeded pipeline, created under the default device and dtype


def _full_vocabulary(*encoders: Any) -> None:
    """Give locally tokenized encoders CLIP's token table, so weights and memory are the real ones.

    Rows past the local tokenizer's vocabulary are never looked up; they only occupy memory, as
    the real model's do. ``mean_resizing`` would sample them from a covariance (no half CPU/GPU
    kernel for its Cholesky); a plain normal draw is as good for random weights.
    """
    for encoder in encoders:
        encoder.resize_token_embeddings(CLIP_VOCAB_SIZE, mean_resizing=False)


def _build_sd15() -> Any:
    from masactrl_core.tiny import build_sd_pipeline

    pipe = build_sd_pipeline(
        0, unet_config=SD15_UNET_CONFIG, vae_config=SD15_VAE_CONFIG, text_config=CLIP_L_TEXT_CONFIG
    )
    _full_vocabulary(pipe.text_encoder)
    return pipe


def _build_sdxl() -> Any:
    from masactrl_core.tiny import build_sdxl_pipeline

    pipe = build_sdxl_pipeline(
        0,
        unet_config=SDXL_UNET_CONFIG,
        vae_config=SDXL_VAE_CONFIG,
        text_config=CLIP_L_TEXT_CONFIG,
        text_config_2=OPENCLIP_BIGG_TEXT_CONFIG,
    )
    _full_vocabulary(pipe.text_encoder, pipe.text_encoder_2)
    return pipe


def _build_flux() -> Any:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from bench.mmdit import FLUX_DEV_TRANSFORMER
    from masactrl_core.tiny_mmdit import build_flux_pipeline

    # The tiny checkpoint's tokenizers and FLUX.1 [dev]'s scheduler config; full-size modules.
    tiny = build_flux_pipeline(0)
    tokenizer, tokenizer_2 = tiny.tokenizer, tiny.tokenizer_2
    tokenizer_2.model_max_length = 512  # FLUX.1 [dev]'s T5 length
    clip = CLIPTextConfig(
        **CLIP_L_TEXT_CONFIG,
        vocab_size=CLIP_VOCAB_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return FluxPipeline(
        scheduler=tiny.scheduler,
        vae=AutoencoderKL(**FLUX_VAE_CONFIG),
        text_encoder=CLIPTextModel(clip),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(T5Config(**T5_XXL_CONFIG)),
        tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
    )


def _build_tiny_flux() -> Any:
    from masactrl_core.tiny_mmdit import build_flux_pipeline

    return build_flux_pipeline(0)


def _build_tiny_sd() -> Any:
    from masactrl_core.tiny import build_sd_pipeline

    return build_sd_pipeline(0)


def _build_tiny_sdxl() -> Any:
    from masactrl_core.tiny import build_sdxl_pipeline

    return build_sdxl_pipeline(0)


FULL_MODELS = {
    "sd": Model("sd", "SD1.5", 512, _build_sd15),
    "sdxl": Model("sdxl", "SDXL", 1024, _build_sdxl),
    "flux": Model("flux", "FLUX.1 [dev]", 1024, _build_flux),
}
TINY_MODELS = {
    "sd": Model("sd", "tiny SD", 64, _build_tiny_sd),
    "sdxl": Model("sdxl", "tiny SDXL", 64, _build_tiny_sdxl),
    "flux": Model("flux", "tiny FLUX", 64, _build_tiny_flux),
}


@contextlib.contextmanager
def created_on(device: Any, dtype: Any) -> Iterator[None]:
    """New tensors (parameters included) are created on ``device`` in ``dtype`` inside the block.

    Only the building happens here: schedulers made inside would hold float16 CUDA tensors, so the
    pipeline's scheduler is replaced outside (``prepare``).
    """
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def prepare(model: Model, device: Any, dtype: Any) -> tuple[Any, Any]:
    """The seeded pipeline, sampling with DDIM as the engine does, and an engine sharing it."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    from masactrl_core import MasaCtrlEngine

    with created_on(device, dtype):
        pipe = model.build()
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval().requires_grad_(False)
    if hasattr(pipe, "unet"):
        # The plain generation samples with DDIM too (SDXL ships Euler), so only the control
        # differs. FLUX keeps its flow-matching scheduler, which the engine's solver follows.
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    # The engine upcasts SDXL's VAE to float32 (force_upcast), as the SDXL pipeline does for its
    # decode; both then decode in float32.
    engine = MasaCtrlEngine(pipe, family=model.family, model_name=model.label)
    return pipe, engine


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One timed run."""

    images: int  # images the run returns
    unet_image_evals: int  # rows through the UNet, counted by a hook
    engine_unet_image_evals: int | None  # what the engine reports (None for diffusers' pipeline)
    seconds: float
    peak_memory_bytes: int | None  # CUDA only: torch.cuda.max_memory_allocated, weights included
    model_memory_bytes: int | None  # CUDA only: allocated before the run (the loaded model)


@dataclass
class UNetRows:
    """Counts the image rows of every UNet call (a batch of B latents is B evaluations)."""

    rows: int = 0

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # A UNet's ``sample`` or a transformer's ``hidden_states``: rows first either way.
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        assert sample is not None, "the denoiser was called without its input"
        self.rows += int(sample.shape[0])


@dataclass
class Runner:
    """Runs and times the three runs of one model."""

    pipe: Any
    engine: Any
    size: int
    device: Any
    counter: UNetRows = field(default_factory=UNetRows)

    def __post_init__(self) -> None:
        import torch
        from PIL import Image

        self.denoiser = getattr(self.pipe, "unet", None) or self.pipe.transformer
        self.denoiser.register_forward_pre_hook(self.counter, with_kwargs=True)
        # FLUX.1 [dev] takes guidance as an input at its own scale; the UNets use CFG at 7.5.
        self.guidance = FLUX_GUIDANCE if self.engine.family == "flux" else GUIDANCE
        # The edited "photo": seeded noise pixels (random weights make any image as good).
        pixels = torch.randint(
            0, 256, (self.size, self.size, 3), generator=torch.Generator("cpu").manual_seed(0)
        )
        self.image = Image.fromarray(pixels.to(torch.uint8).numpy())

    def control(self, steps: int) -> Any:
        """The paper's control: from step 4 (or the last step of a short run), in the blocks from
        the engine's default start layer (10/16 of the UNet's depth) on."""
        from masactrl_core import ControlConfig

        return ControlConfig(
            start_step=min(PAPER_START_STEP, steps - 1),
            start_layer=self.engine.default_control.start_layer,
        )

    def plain(self, steps: int) -> tuple[int, int | None]:
        import torch

        # diffusers' SDXL pipeline wants its VAE in the pipeline's dtype: it upcasts a float16
        # VAE for the decode and casts it back, but cannot decode float16 latents with the
        # float32 VAE the engine keeps. The two casts around the call take milliseconds.
        engine_vae_dtype = self.pipe.vae.dtype
        self.pipe.vae.to(self.denoiser.dtype)
        try:
            output = self.pipe(
                PROMPT,
                num_inference_steps=steps,
                guidance_scale=self.guidance,
                height=self.size,
                width=self.size,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="pil",
            )
        finally:
            self.pipe.vae.to(engine_vae_dtype)
        return len(output.images), None

    def edit(self, steps: int) -> tuple[int, int | None]:
        result = self.engine.edit(
            self.image,
            [PROMPT],
            source_prompt="",
            steps=steps,
            guidance_scale=self.guidance,
            width=self.size,
            height=self.size,
            control=self.control(steps),
        )
        return 1 + len(result.targets), result.stats.unet_image_evals

    def synthesis(self, steps: int) -> tuple[int, int | None]:
        result = self.engine.synthesize(
            SOURCE_PROMPT,
            list(SYNTHESIS_TARGETS),
            seed=0,
            steps=steps,
            guidance_scale=self.guidance,
            width=self.size,
            height=self.size,
            control=self.control(steps),
        )
        return 1 + len(result.targets), result.stats.unet_image_evals

    def measure(self, run: Callable[[int], tuple[int, int | None]], steps: int) -> Measurement:
        import torch

        cuda = self.device.type == "cuda"
        run(WARMUP_STEPS)
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        model_bytes = torch.cuda.memory_allocated(self.device) if cuda else None
        self.counter.rows = 0
        started = time.perf_counter()
        images, engine_evals = run(steps)
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        return Measurement(
            images=images,
            unet_image_evals=self.counter.rows,
            engine_unet_image_evals=engine_evals,
            seconds=seconds,
            peak_memory_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else None,
            model_memory_bytes=model_bytes,
        )


RUNS = ("plain", "edit", "synthesis")
RUN_LABELS = {
    "plain": "plain diffusers generation (1 image)",
    "edit": "MasaCtrl edit (inversion + 1 target)",
    "synthesis": f"MasaCtrl synthesis (source + {len(SYNTHESIS_TARGETS)} targets)",
}


def benchmark(model: Model, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Build one model, time its three runs, free it; the family's record."""
    import torch

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    started = time.perf_counter()
    pipe, engine = prepare(model, device, dtype)
    build_seconds = time.perf_counter() - started
    log(f"{model.label}: built in {build_seconds:.1f} s ({engine.block_count} attention blocks)")
    size = args.size or model.size
    runner = Runner(pipe, engine, size, device)
    runs: dict[str, Measurement] = {}
    for name in RUNS:
        runs[name] = runner.measure(getattr(runner, name), args.steps)
        log(
            f"{model.label}: {name} {runs[name].seconds:.2f} s, "
            f"{runs[name].unet_image_evals} UNet image evaluations"
        )
    ratio = runs["edit"].seconds / runs["plain"].seconds
    record = {
        "label": model.label,
        "size": size,
        "block_count": engine.block_count,
        "control": asdict(runner.control(args.steps)),
        "build_seconds": build_seconds,
        "runs": {name: asdict(m) for name, m in runs.items()},
        "edit_over_plain": ratio,
        "goal_met": ratio <= GOAL,
    }
    del runner, engine, pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


# --- report ----------------------------------------------------------------------------------


def machine(device: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    info: dict[str, Any] = {
        "description": describe_machine(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(index)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(index).total_memory
    return info


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def table(record: dict[str, Any]) -> str:
    """The Markdown report: the machine, one row per run, the goal per family."""
    settings, info = record["settings"], record["machine"]
    where = info["gpu"] or f"CPU ({info['description'].split(',')[0].removeprefix('CPU ')})"
    lines = [
        f"{where}, {settings['device']} {settings['dtype']}, torch {info['torch']}, "
        f"diffusers {info['diffusers']}, transformers {info['transformers']}; "
        f"{settings['steps']} steps, guidance {settings['guidance_scale']}"
        + (
            f" (FLUX: {settings['flux_guidance_scale']}, a model input)"
            if "flux" in record["families"]
            else ""
        )
        + (" (--tiny: tiny models, not the goal's setting)" if settings["tiny"] else ""),
        "",
        "| model | run | images | UNet image evals | s | s / plain | peak memory (model) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for family in record["families"].values():
        plain = family["runs"]["plain"]["seconds"]
        for name in RUNS:
            run = family["runs"][name]
            memory = _gib(run["peak_memory_bytes"])
            if run["model_memory_bytes"] is not None:
                memory += f" ({_gib(run['model_memory_bytes'])})"
            lines.append(
                f"| {family['label']} {family['size']}x{family['size']} | {RUN_LABELS[name]} | "
                f"{run['images']} | {run['unet_image_evals']} | {run['seconds']:.2f} | "
                f"{run['seconds'] / plain:.2f} | {memory} |"
            )
    lines.append("")
    for family in record["families"].values():
        lines.append(
            f"{family['label']}: edit / plain generation = {family['edit_over_plain']:.2f}x "
            f"(goal <= {GOAL}x): " + ("met" if family["goal_met"] else "NOT MET")
        )
    lines.append(
        f"elapsed {record['elapsed_seconds']:.0f} s (imports, building, warm-ups included)"
    )
    return "\n".join(lines)


def write(record: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
    text = table(record)
    (out / "gpu.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models on the CPU in float32 (the test suite)"
    )
    parser.add_argument("--device", help="default cuda, or cpu with --tiny")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        help="default float16, or float32 with --tiny")  # fmt: skip
    parser.add_argument("--steps", type=int, help=f"default {STEPS}, or {TINY_STEPS} with --tiny")
    parser.add_argument("--size", type=int, help="image size (default: 512 SD1.5, 1024 SDXL)")
    parser.add_argument(
        "--families",
        default="sd,sdxl",
        help="comma-separated: sd, sdxl, flux (default sd,sdxl; flux needs about 40 GB of GPU "
        "memory in bfloat16)",
    )
    parser.add_argument("--out", default="out/gpu", help="folder for gpu.json and gpu.md")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.dtype = args.dtype or ("float32" if args.tiny else "float16")
    args.steps = args.steps or (TINY_STEPS if args.tiny else STEPS)
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    models = TINY_MODELS if args.tiny else FULL_MODELS
    unknown = [name for name in families if name not in models]
    if unknown or not families:
        parser.error(f"--families takes {', '.join(models)}; got {args.families!r}")
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be above the {WARMUP_STEPS} warm-up steps")

    # Library advisories (torchvision fallbacks, dtype casts) are noise next to the table.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # The SDXL pipeline calls its own deprecated upcast_vae on every float16 decode.
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --tiny, or --device cpu")
    if args.tiny and args.device == "cpu":
        # Tiny models' operations are too small to share between threads; on a machine shared
        # with other work, extra threads mostly wait for each other (10x slower on 2 busy cores).
        torch.set_num_threads(1)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    record: dict[str, Any] = {
        "machine": machine(args.device),
        "settings": {
            "tiny": args.tiny,
            "device": args.device,
            "dtype": args.dtype,
            "steps": args.steps,
            "warmup_steps": WARMUP_STEPS,
            "guidance_scale": GUIDANCE,
            "flux_guidance_scale": FLUX_GUIDANCE,
            "prompt": PROMPT,
            "synthesis": {"source": SOURCE_PROMPT, "targets": list(SYNTHESIS_TARGETS)},
            "goal_edit_over_plain": GOAL,
        },
        "families": {},
    }
    log(f"imported torch and diffusers on {record['machine']['gpu'] or args.device}")
    out = Path(args.out)
    for name in families:
        record["families"][name] = benchmark(models[name], args, log)
        record["elapsed_seconds"] = time.perf_counter() - started
        text = write(record, out)  # after each family: a stopped run keeps what it finished
    print(text)
    log(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
