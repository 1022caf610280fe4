"""Pickle weights are read only when the caller allows them: a diffusers folder whose component
holds only a ``.bin`` is refused naming that file, and loads when allowed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from masactrl_core import ModelLoadError
from masactrl_core.engine import MasaCtrlEngine


@pytest.fixture()
def pickled_unet(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """The tiny checkpoint with its UNet saved as a pickle and no safetensors beside it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return model


def test_a_model_folder_with_a_pickle_only_component_is_refused(pickled_unet: Path) -> None:
    with pytest.raises(ModelLoadError) as refused:
        MasaCtrlEngine.from_pretrained(pickled_unet, device="cpu")
    assert "model/unet/diffusion_pytorch_model.bin is a pickle file" in str(refused.value)
    assert "set allow_pickle if you trust it" in str(refused.value)


def test_an_allowed_pickle_model_computes_what_its_safetensors_twin_does(
    tiny_checkpoint: Path, pickled_unet: Path
) -> None:
    allowed = MasaCtrlEngine.from_pretrained(pickled_unet, device="cpu", allow_pickle=True)
    safe = MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")
    run = dict(source_prompt="a cat", target_prompts=["a dog"], seed=1, steps=2)
    torch.testing.assert_close(
        allowed.synthesize(**run).latents, safe.synthesize(**run).latents, rtol=0, atol=0
    )
