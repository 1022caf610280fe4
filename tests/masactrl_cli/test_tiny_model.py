"""``masactrl tiny-model``: writes the offline checkpoints of both families."""

from __future__ import annotations

from pathlib import Path

import pytest

from masactrl_cli.main import main


def test_tiny_model_command(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny-model", str(tmp_path / "tiny"), "--seed", "3"]) == 0
    assert "64x64" in capfd.readouterr().out
    assert (tmp_path / "tiny" / "model_index.json").is_file()

    assert main(["tiny-model", str(tmp_path / "xl"), "--family", "sdxl"]) == 0
    assert "tiny sdxl checkpoint" in capfd.readouterr().out
    assert (tmp_path / "xl" / "text_encoder_2").is_dir()


def test_tiny_model_writes_a_preview_autoencoder(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["tiny-model", str(tmp_path / "taesd"), "--preview-vae", "--seed", "2"]) == 0
    assert "tiny preview autoencoder (AutoencoderTiny, seed 2)" in capfd.readouterr().out
    config = (tmp_path / "taesd" / "config.json").read_text()
    assert '"_class_name": "AutoencoderTiny"' in config
    assert main(["tiny-model", str(tmp_path / "x"), "--preview-vae", "--family", "sdxl"]) == 2
    assert "--preview-vae fits every tiny checkpoint: no --condition" in capfd.readouterr().err


def test_tiny_model_writes_a_lora_that_loads_and_changes_the_model(
    tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from masactrl_core import MasaCtrlEngine

    out = tmp_path / "lora"
    assert main(["tiny-model", str(out), "--lora", "--base", str(tiny_checkpoint)]) == 0
    assert "tiny LoRA adapter (rank 4, seed 0" in capfd.readouterr().out
    engine = MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")
    plain = engine.synthesize("a cat", ["a dog"], seed=1, steps=2).latents
    engine.loras.load("style", out)
    with engine.loras.activated({"style": 1.0}):
        styled = engine.synthesize("a cat", ["a dog"], seed=1, steps=2).latents
    assert (styled - plain).abs().max() > 1e-3
    assert main(["tiny-model", str(tmp_path / "x"), "--lora"]) == 2
    assert "--lora needs --base" in capfd.readouterr().err


def test_tiny_model_writes_the_multimodal_transformer_families(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        StableDiffusion3Pipeline,
    )

    assert main(["tiny-model", str(tmp_path / "flux"), "--family", "flux"]) == 0
    described = capfd.readouterr().out
    assert "tiny flux checkpoint (seed 0)" in described and "4 transformer blocks" in described
    flux = FluxPipeline.from_pretrained(tmp_path / "flux")
    assert flux.transformer.config.guidance_embeds
    assert flux.vae.config.latent_channels == 16
    assert (tmp_path / "flux" / "tokenizer_2" / "tokenizer.json").is_file()

    assert main(["tiny-model", str(tmp_path / "sd3"), "--family", "sd3"]) == 0
    assert "tiny sd3 checkpoint (seed 0)" in capfd.readouterr().out
    sd3 = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3")
    assert sd3.text_encoder_3 is not None and sd3.transformer.config.num_layers == 3

    assert (
        main(["tiny-model", str(tmp_path / "x"), "--family", "flux", "--variant", "shallow"]) == 2
    )
    assert "one shape" in capfd.readouterr().err
