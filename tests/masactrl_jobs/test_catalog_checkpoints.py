"""The catalog's single-file models and LoRA adapters, and how a job's adapters resolve."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from masactrl_jobs.catalog import CatalogError, UnknownLora, catalog_from_data, is_single_file
from masactrl_jobs.control import InvalidParameters, lora_problems, resolve_loras
from masactrl_jobs.schema import LoraParams, SynthesisCreate

SINGLE_FILE = {
    "name": "anything",
    "source": "/models/anything-v4.5.safetensors",
    "family": "sd",
    "config": "/models/configs/sd15",
    "loras": {
        "watercolor": {"source": "/models/loras/watercolor.safetensors", "weight": 0.8},
        "ink": {"source": "/models/loras/ink"},
    },
}


def catalog(**changes: object) -> object:
    return catalog_from_data({"default": "anything", "models": [{**SINGLE_FILE, **changes}]})


def test_a_single_file_model_with_adapters() -> None:
    entry = catalog().get("anything")  # type: ignore[attr-defined]
    assert entry.single_file and entry.config == "/models/configs/sd15"
    assert entry.prediction_type is None and not entry.allow_pickle
    assert entry.lora("watercolor").weight == 0.8
    assert entry.lora("ink").weight == 1.0  # the default weight
    with pytest.raises(UnknownLora, match="anything has no LoRA adapter 'oil'; available: ink, w"):
        entry.lora("oil")
    assert is_single_file("m.safetensors") and is_single_file("M.CKPT")
    assert not is_single_file("owner/name") and not is_single_file("/models/folder")


def test_pickle_checkpoints_need_allow_pickle_with_the_reason() -> None:
    with pytest.raises(CatalogError, match="pickle checkpoint, which can run arbitrary code"):
        catalog(source="/models/old.ckpt")
    assert catalog(source="/models/old.ckpt", allow_pickle=True).get().allow_pickle  # type: ignore[attr-defined]
    with pytest.raises(CatalogError, match=r"loras\.bad: .*pickle file"):
        catalog(loras={"bad": {"source": "/models/bad.pt"}})
    trusted = {"source": "/models/old.bin", "allow_pickle": True}
    entry = catalog(loras={"old": trusted}).get()  # type: ignore[attr-defined]
    assert entry.lora("old").allow_pickle
    assert not catalog().get().lora("ink").allow_pickle  # type: ignore[attr-defined]


def test_single_file_options_belong_to_single_files() -> None:
    with pytest.raises(CatalogError, match="config applies only to a single-file source"):
        catalog(source="/models/a-folder")
    with pytest.raises(CatalogError, match="prediction_type applies only to a single-file"):
        catalog(source="owner/name", config=None, prediction_type="v_prediction")
    v = catalog(prediction_type="v_prediction").get()  # type: ignore[attr-defined]
    assert v.prediction_type == "v_prediction"
    with pytest.raises(CatalogError, match="prediction_type"):
        catalog(prediction_type="sample")
    flux = {"source": "/models/flux1-dev.safetensors", "family": "flux", "loras": {}}
    assert catalog(**flux).get().single_file  # type: ignore[attr-defined]
    with pytest.raises(CatalogError, match="prediction_type applies only to sd and sdxl single"):
        catalog(**flux, prediction_type="epsilon")


def test_adapter_names_and_weights_are_checked() -> None:
    with pytest.raises(CatalogError, match="LoRA name 'Bad Name' must be lowercase"):
        catalog(loras={"Bad Name": {"source": "/x.safetensors"}})
    with pytest.raises(CatalogError, match="weight"):
        catalog(loras={"big": {"source": "/x.safetensors", "weight": 9}})


def test_a_job_resolves_its_adapters_against_the_model() -> None:
    entry = catalog().get()  # type: ignore[attr-defined]
    asked = [LoraParams(name="ink", weight=-0.5), LoraParams(name="watercolor")]
    resolved = resolve_loras(entry, asked)
    assert [(lora.name, lora.weight) for lora in resolved] == [("ink", -0.5), ("watercolor", 0.8)]
    problems = lora_problems(entry, [LoraParams(name="ink"), LoraParams(name="oil")])
    assert [(p.field, p.message) for p in problems] == [
        (("loras", 1, "name"), "anything has no LoRA adapter 'oil'; available: ink, watercolor")
    ]
    with pytest.raises(InvalidParameters, match="no LoRA adapter 'oil'"):
        resolve_loras(entry, [LoraParams(name="oil")])


def test_requests_name_at_most_four_distinct_adapters() -> None:
    body = {"source_prompt": "a cat", "target_prompts": ["a dog"]}
    assert SynthesisCreate.model_validate(body).loras == []
    four = [{"name": f"l{i}"} for i in range(4)]
    assert len(SynthesisCreate.model_validate({**body, "loras": four}).loras) == 4
    with pytest.raises(ValidationError, match="at most 4 items"):
        SynthesisCreate.model_validate({**body, "loras": [*four, {"name": "l4"}]})
    with pytest.raises(ValidationError, match="each LoRA adapter may be named once; repeated: a"):
        SynthesisCreate.model_validate({**body, "loras": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValidationError, match="less than or equal to 4"):
        SynthesisCreate.model_validate({**body, "loras": [{"name": "a", "weight": 5}]})
    with pytest.raises(ValidationError, match="Extra inputs"):
        SynthesisCreate.model_validate({**body, "loras": [{"name": "a", "scale": 1}]})
