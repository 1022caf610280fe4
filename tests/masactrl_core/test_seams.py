"""The engine's seams: the backbone registry, the solver interface, and the facade over them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

import masactrl_core
from masactrl_core import ModelLoadError
from masactrl_core.backbones import (
    BACKBONES,
    backbone_class,
    condition_family,
    detect_family,
)
from masactrl_core.backbones.sd import SDBackbone
from masactrl_core.backbones.sdxl import SDXLBackbone
from masactrl_core.engine import MasaCtrlEngine, with_options
from masactrl_core.solvers import DDIMSolver, Solver

# -- the registry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "family"),
    [
        ({"_class_name": "StableDiffusionPipeline", "text_encoder": ["t", "CLIPTextModel"]}, "sd"),
        ({"_class_name": "StableDiffusionXLPipeline"}, "sdxl"),
        ({"_class_name": "SomePipeline", "text_encoder_2": ["t", "CLIP"]}, "sdxl"),
        # FLUX has a text_encoder_2 (T5) too: its pipeline class is asked first.
        ({"_class_name": "FluxPipeline", "text_encoder_2": ["t", "T5EncoderModel"]}, "flux"),
        ({"_class_name": "StableDiffusion3Pipeline", "text_encoder_2": ["t", "CLIP"]}, "sd3"),
        ({}, "sd"),
    ],
)
def test_detect_family_asks_each_backbone_most_specific_first(config, family):
    assert detect_family(config) == family
    assert list(BACKBONES)[-1] == "sd"  # the fallback recognizes anything SD-shaped


def test_an_unknown_family_is_a_load_error():
    with pytest.raises(
        ModelLoadError,
        match="unknown model family 'kandinsky'; expected one of flux, sd, sd3, sdxl",
    ):
        backbone_class("kandinsky")


@pytest.mark.parametrize(
    ("kind", "config", "family"),
    [
        ("controlnet", {"addition_embed_type": "text_time"}, "sdxl"),
        ("controlnet", {"addition_embed_type": None}, "sd"),
        ("adapter", {"adapter_type": "full_adapter_xl"}, "sdxl"),
        ("adapter", {"adapter_type": "full_adapter"}, "sd"),
        ("adapter", {"adapter_type": "light_adapter"}, "sd"),
    ],
)
def test_condition_models_belong_to_the_family_whose_backbone_claims_them(kind, config, family):
    assert condition_family(kind, config) == family


def test_an_sdxl_refiner_is_refused_by_its_backbone():
    SDXLBackbone.check_config({"text_encoder": ["transformers", "CLIPTextModel"]}, "base")
    with pytest.raises(ModelLoadError, match="no first text encoder"):
        SDXLBackbone.check_config({"_class_name": "StableDiffusionXLPipeline"}, "refiner")


def test_no_family_branch_outside_the_backbones():
    # A new family is a backbone module, never one more `family == "..."` elsewhere.
    package = Path(masactrl_core.__file__).parent
    branch = re.compile(r"family\s*[!=]=\s*[\"']")
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "backbones" not in path.parts and branch.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


# -- the DDIM solver ------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_inverse_step_is_the_exact_inverse_of_the_sampling_step(prediction_type, spacing):
    config = DDIMScheduler(prediction_type=prediction_type, timestep_spacing=spacing).config
    solver = DDIMSolver(config)
    assert isinstance(solver, Solver)
    generator = torch.Generator().manual_seed(0)
    steps = list(solver.inversion_steps(10, torch.device("cpu")))
    timesteps = solver.timesteps(10, torch.device("cpu"))
    # Inversion order is the sampling order reversed.
    assert [int(s.timestep) for s in steps] == [int(t) for t in timesteps.flip(0)]
    for step in steps:
        cleaner = torch.randn((1, 4, 8, 8), generator=generator, dtype=torch.float64)
        output = torch.randn((1, 4, 8, 8), generator=generator, dtype=torch.float64)
        noisier = solver.inverse_step(output, step, cleaner)
        back = solver.step(output, step.timestep, noisier).prev_sample
        assert (back - cleaner).abs().max() < 1e-5


def test_ddim_refuses_other_prediction_types():
    with pytest.raises(ModelLoadError, match="prediction_type 'sample' is not supported"):
        DDIMSolver(DDIMScheduler(prediction_type="sample").config)


# -- the facade over the parts --------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> MasaCtrlEngine:
    return MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")


def test_the_engine_composes_a_backbone_a_solver_and_the_sampler(engine):
    assert isinstance(engine.backbone, SDBackbone) and isinstance(engine.solver, DDIMSolver)
    assert engine.sampler.backbone is engine.backbone and engine.sampler.solver is engine.solver
    assert engine.unet is engine.pipeline.unet is engine.backbone.denoiser
    assert engine.scheduler is engine.solver.scheduler
    assert (engine.family, engine.block_count) == ("sd", len(engine.backbone.layer_names))
    assert engine.describe()["timestep_spacing"] == engine.scheduler.config.timestep_spacing


def test_a_view_has_its_own_parts_over_the_same_modules(engine):
    view = with_options(engine, max_batch=3)
    view.block_levels = [0] * engine.block_count
    view.processor_class = object
    assert view.unet is engine.unet and view.options.max_batch == 3
    assert engine.block_levels != view.block_levels
    assert engine.processor_class is not object and engine.options.max_batch == 16


def test_a_family_the_registry_does_not_know_is_refused(engine):
    with pytest.raises(ModelLoadError, match="unknown model family"):
        MasaCtrlEngine(engine.pipeline, family="kandinsky")
