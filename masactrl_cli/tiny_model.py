"""``masactrl tiny-model``: write the offline random-weight checkpoint that tests and demos use.

With ``--condition controlnet|adapter --base BASE_DIR`` it writes a seeded ControlNet or
T2I-Adapter whose shapes fit the tiny checkpoint in BASE_DIR (its family comes from there). With
``--preview-vae`` it writes a seeded tiny ``AutoencoderTiny`` that decodes either family's live
previews (a catalog entry's ``preview_vae``). With ``--lora --base BASE_DIR`` it writes a seeded
random LoRA adapter (denoiser and text encoder) for the sd or flux tiny checkpoint in BASE_DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from masactrl_cli.errors import UsageError


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of ``tiny-model``."""
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--family",
        choices=("sd", "sdxl", "sd3", "flux"),
        help="model family (default sd; not with --condition): sd3 and flux write tiny "
        "multimodal diffusion transformers (FLUX: 2 double- and 2 single-stream blocks)",
    )
    parser.add_argument(
        "--variant",
        choices=("standard", "two-level", "no-mid", "three-level", "shallow"),
        default="standard",
        help="the UNet's shape: the family's reference (standard: 16 blocks for sd, 70 for "
        "sdxl), or a pruned model's: sd two-level (7 blocks), no-mid (9, no mid block, as "
        "BK-SDM), three-level (11); sdxl shallow (17, as SSD-1B)",
    )
    parser.add_argument(
        "--condition",
        choices=("controlnet", "adapter"),
        help="write a ControlNet or T2I-Adapter for the checkpoint in --base instead",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="write a seeded random LoRA adapter for the sd or flux checkpoint in --base instead",
    )
    parser.add_argument(
        "--base",
        type=Path,
        metavar="BASE_DIR",
        help="tiny checkpoint the condition model or the LoRA fits",
    )
    parser.add_argument(
        "--preview-vae",
        action="store_true",
        help="write a tiny AutoencoderTiny that decodes live previews instead",
    )


def run(args: argparse.Namespace) -> int:
    """Write the checkpoint and print what it is (path, native size) on stdout."""
    from masactrl_cli.generate import quiet_libraries

    out: Path = args.out_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if args.lora and (args.condition is not None or args.preview_vae or args.family is not None):
        raise UsageError(
            "--lora fits the checkpoint in --base: no --condition, --preview-vae or --family"
        )
    if args.condition is None and not args.lora and args.base is not None:
        raise UsageError("--base is only used with --condition or --lora")
    if args.variant != "standard" and (args.condition is not None or args.preview_vae or args.lora):
        raise UsageError(
            "--variant shapes a checkpoint's UNet: no --condition, --preview-vae or --lora"
        )
    if args.preview_vae and (args.condition is not None or args.family is not None):
        raise UsageError("--preview-vae fits every tiny checkpoint: no --condition or --family")
    if args.lora and (args.base is None or not (args.base / "model_index.json").is_file()):
        raise UsageError(
            "--lora needs --base, the tiny sd or flux checkpoint (with model_index.json)"
        )
    if args.condition is not None:
        if args.base is None:
            raise UsageError("--condition needs --base, the tiny checkpoint it is made for")
        if args.family is not None:
            raise UsageError("--family is read from --base when writing a condition model")
        if not (args.base / "model_index.json").is_file():
            raise UsageError(f"{args.base} is not a diffusers checkpoint (no model_index.json)")
    quiet_libraries()
    try:
        if args.preview_vae:
            description = _write_preview_vae(out, args.seed)
        elif args.lora:
            description = _write_lora(out, args.base, args.seed)
        elif args.condition is not None:
            description = _write_condition(out, args.condition, args.base, args.seed)
        else:
            description = _write_checkpoint(out, args.family or "sd", args.seed, args.variant)
    except (NotImplementedError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(description)
    sys.stdout.flush()
    return 0


def _write_checkpoint(out: Path, family: str, seed: int, variant: str) -> str:
    from masactrl_core.tiny import tiny_checkpoint_info, write_tiny_checkpoint

    path = write_tiny_checkpoint(out, seed=seed, family=family, variant=variant)
    return tiny_checkpoint_info(path, seed=seed, family=family, variant=variant).describe()


def _write_condition(out: Path, kind: str, base: Path, seed: int) -> str:
    from masactrl_core.tiny_conditions import (
        describe_tiny_condition_model,
        write_tiny_condition_model,
    )

    path = write_tiny_condition_model(out, kind=kind, base=base, seed=seed)
    return describe_tiny_condition_model(path, kind, base, seed)


def _write_preview_vae(out: Path, seed: int) -> str:
    from masactrl_core.tiny import write_tiny_preview_vae

    path = write_tiny_preview_vae(out, seed=seed)
    return f"tiny preview autoencoder (AutoencoderTiny, seed {seed}) at {path}"


def _write_lora(out: Path, base: Path, seed: int) -> str:
    from masactrl_core.tiny_lora import write_tiny_lora

    info = write_tiny_lora(base, out, seed=seed)
    return f"tiny LoRA adapter (rank {info.rank}, seed {seed}, for {base}) at {info.file}"
