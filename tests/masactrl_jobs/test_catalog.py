"""The model catalog: family defaults, validation messages and loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from masactrl_jobs.catalog import (
    Catalog,
    CatalogError,
    ConditionEntry,
    ModelEntry,
    UnknownCondition,
    UnknownModel,
    catalog_from_data,
    default_catalog,
    load_catalog,
    parse_catalog,
)
from masactrl_jobs.shape import ModelShape


def test_default_catalog_matches_the_conventions() -> None:
    catalog = default_catalog()
    assert catalog.default == "sd15"
    sd15, sdxl = catalog.get("sd15"), catalog.get("sdxl")
    assert (sd15.source, sd15.family, sd15.native_size) == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "sd",
        (512, 512),
    )
    assert (sd15.block_count, sd15.default_start_layer, sd15.size_multiple) == (16, 10, 64)
    assert (sdxl.source, sdxl.family, sdxl.native_size) == (
        "stabilityai/stable-diffusion-xl-base-1.0",
        "sdxl",
        (1024, 1024),
    )
    assert (sdxl.block_count, sdxl.default_start_layer, sdxl.size_multiple) == (70, 44, 32)
    assert sd15.default_control == {"start_step": 4, "start_layer": 10}
    assert catalog.get() == sd15
    assert "sdxl" in catalog and "tiny" not in catalog


def test_overrides_win_over_family_defaults() -> None:
    entry = ModelEntry(
        name="tiny",
        source="/models/tiny-sd",
        family="sd",
        native_width=64,
        native_height=128,
        block_count=4,
        default_start_layer=2,
        default_start_step=1,
        max_pixels=128 * 128,
    )
    assert entry.native_size == (64, 128)
    assert entry.default_control == {"start_step": 1, "start_layer": 2}


def test_models_may_be_keyed_by_name() -> None:
    catalog = parse_catalog(
        json.dumps({"default": "a", "models": {"a": {"source": "x", "family": "sdxl"}}})
    )
    assert catalog.get("a").family == "sdxl"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"models": [], "default": "a"}, "models: List should have at least 1 item"),
        (
            {"default": "b", "models": [{"name": "a", "source": "x", "family": "sd"}]},
            "default 'b' is not one of the models (a)",
        ),
        (
            {"default": "a", "models": [{"name": "a", "source": "x", "family": "sd"}] * 2},
            "repeated: a",
        ),
        (
            {"default": "a", "models": [{"name": "a", "source": "x", "family": "dit"}]},
            "models[0]: family 'dit' is not 'sd' or 'sdxl' or 'sd3' or 'flux'",
        ),
        (
            {"default": "a", "models": [{"name": "a", "source": "x"}]},
            "models[0]: family is required",
        ),
        (
            {"default": "a", "models": [{"name": "A b", "source": "x", "family": "sd"}]},
            "models[0].name: String should match pattern",
        ),
        (
            {
                "default": "a",
                "models": [{"name": "a", "source": "x", "family": "sd", "native_width": 500}],
            },
            "native_width 500 is not a multiple of 64",
        ),
        (
            {
                "default": "a",
                "models": [{"name": "a", "source": "x", "family": "sd", "default_start_layer": 16}],
            },
            "default_start_layer 16 must be below block_count 16",
        ),
        (
            {
                "default": "a",
                "models": [{"name": "a", "source": "x", "family": "sd", "colour": "red"}],
            },
            "models[0].colour: Extra inputs are not permitted",
        ),
        (
            {"default": "a", "models": [{"name": "a", "source": "", "family": "sd"}]},
            "models[0].source",
        ),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_malformed_catalogs_say_what_is_wrong(data: object, message: str) -> None:
    with pytest.raises(CatalogError) as caught:
        catalog_from_data(data, origin="test catalog")
    assert str(caught.value).startswith("test catalog ")
    assert message in str(caught.value)


def test_invalid_json_gives_the_position() -> None:
    with pytest.raises(CatalogError, match=r"MASACTRL_CATALOG is not valid JSON: .* line 2 column"):
        parse_catalog('{"default": "a",\n "models": [}', origin="MASACTRL_CATALOG")


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(UnknownModel) as caught:
        default_catalog().get("sd3")
    assert str(caught.value) == "unknown model 'sd3'; available: sd15, sdxl"
    assert isinstance(caught.value, KeyError)


def test_catalog_is_immutable() -> None:
    catalog = default_catalog()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type is an implementation detail
        catalog.default = "sdxl"  # type: ignore[misc]
    assert isinstance(catalog, Catalog)


def test_load_catalog_reads_the_configured_source(tmp_path: Path) -> None:
    inline = {"default": "tiny", "models": [{"name": "tiny", "source": "/m/tiny", "family": "sd"}]}
    source = SimpleNamespace(catalog=json.dumps(inline), catalog_file=None)
    assert load_catalog(source).names() == ["tiny"]
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(inline))
    assert load_catalog(SimpleNamespace(catalog=None, catalog_file=path)).default == "tiny"
    assert load_catalog(SimpleNamespace(catalog=None, catalog_file=None)).default == "sd15"
    missing = SimpleNamespace(catalog=None, catalog_file=tmp_path / "missing.json")
    with pytest.raises(
        CatalogError, match=r"MASACTRL_CATALOG_FILE \(.*missing.json\) does not exist"
    ):
        load_catalog(missing)


@pytest.mark.parametrize(
    "code",
    [
        "from masactrl_jobs.settings import CommonSettings\n"
        "CommonSettings(_env_file=None, environment='development')\n"
        "assert 'masactrl_jobs.catalog' not in sys.modules",
        "import masactrl_jobs.catalog\nassert 'masactrl_jobs.settings' not in sys.modules",
    ],
)
def test_the_catalog_and_the_settings_do_not_import_each_other(code: str) -> None:
    # Loading the catalog is a start-up step, not a side effect of building settings.
    subprocess.run([sys.executable, "-c", f"import sys\n{code}"], check=True)


# --- layout condition models -----------------------------------------------------------------


def _with_conditions(conditions: object, family: str = "sd") -> dict[str, object]:
    return {
        "default": "m",
        "models": {"m": {"source": "/models/m", "family": family, "conditions": conditions}},
    }


def test_conditions_take_their_models_family_and_are_looked_up_by_name() -> None:
    catalog = catalog_from_data(
        _with_conditions(
            {
                "canny": {"source": "/models/canny", "kind": "controlnet"},
                "depth": {"source": "org/depth-adapter", "kind": "t2i_adapter", "family": "sd"},
            }
        )
    )
    entry = catalog.get("m")
    assert entry.condition("canny") == ConditionEntry(
        source="/models/canny", kind="controlnet", family="sd"
    )
    assert entry.condition("depth").kind == "t2i_adapter"
    with pytest.raises(UnknownCondition, match="m has no condition model 'pose'; available: canny"):
        entry.condition("pose")
    assert default_catalog().get("sd15").conditions == {}


@pytest.mark.parametrize(
    ("conditions", "family", "message"),
    [
        (
            {"canny": {"source": "/c", "kind": "controlnet", "family": "sd"}},
            "sdxl",
            "condition 'canny' is made for sd models, but m is sdxl",
        ),
        ({"canny": {"source": "/c", "kind": "lora"}}, "sd", "kind"),
        ({"canny": {"kind": "controlnet"}}, "sd", "source"),
        ({"canny": {"source": "/c", "kind": "controlnet", "url": "x"}}, "sd", "url"),
        ({"Canny Edges": {"source": "/c", "kind": "controlnet"}}, "sd", "condition name"),
        (
            {"canny": {"source": "/c", "kind": "controlnet"}},
            "flux",
            "conditions: m is flux, and layout conditions and sequences are not available on "
            "FLUX.1 models yet",
        ),
        ({"canny": {"source": "/c", "kind": "controlnet"}}, "sd3", "not available on SD3"),
    ],
)
def test_bad_conditions_are_refused_with_a_sentence(
    conditions: object, family: str, message: str
) -> None:
    with pytest.raises(CatalogError, match="catalog is invalid") as raised:
        catalog_from_data(_with_conditions(conditions, family))
    assert message in str(raised.value)


def test_a_local_checkpoint_declares_its_default_control(tmp_path: Path) -> None:
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "masactrl.json").write_text('{"start_step": 3, "start_layer": 12}')
    declared = {"name": "toy", "source": str(folder), "family": "sd"}
    explicit = {**declared, "name": "toy2", "default_start_layer": 9}
    catalog = catalog_from_data({"default": "toy", "models": [declared, explicit]})
    assert catalog.get("toy").default_control == {"start_step": 3, "start_layer": 12}
    # The catalog's own value wins over the folder's.
    assert catalog.get("toy2").default_control == {"start_step": 3, "start_layer": 9}
    keyed = catalog_from_data({"default": "toy", "models": {"toy": declared}})
    assert keyed.get("toy").default_start_layer == 12


def test_a_declaration_of_a_vocabulary_only_leaves_the_default_control_to_the_rules(
    tmp_path: Path,
) -> None:
    declaring, plain = tmp_path / "declaring", tmp_path / "plain"
    declaring.mkdir()
    plain.mkdir()
    (declaring / "masactrl.json").write_text('{"vocabulary": ["a", "creature"]}')
    entries = [
        {"name": "toy", "source": str(declaring), "family": "sd"},
        {"name": "plain", "source": str(plain), "family": "sd"},
    ]
    catalog = catalog_from_data({"default": "toy", "models": entries})
    assert catalog.get("toy").default_control == catalog.get("plain").default_control


def test_a_broken_control_declaration_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "masactrl.json").write_text('{"start_step": 3}')
    with pytest.raises(CatalogError, match="start_step and start_layer"):
        catalog_from_data(
            {"default": "toy", "models": [{"name": "toy", "source": str(tmp_path), "family": "sd"}]}
        )


def test_flux_defaults_follow_the_family_then_what_the_engine_reports() -> None:
    entry = catalog_from_data(
        {"default": "f", "models": [{"name": "f", "source": "org/flux", "family": "flux"}]}
    ).get("f")
    # FLUX.1 [dev]'s reference: 19 double-stream blocks, the control from the first single one.
    assert (entry.block_count, entry.default_control) == (57, {"start_step": 4, "start_layer": 19})
    assert entry.features.negative_prompt is False
    # A tiny FLUX model as its worker measures it, with its engine's default control.
    reported = ModelShape(
        family="flux",
        block_count=4,
        native_width=64,
        native_height=64,
        size_multiple=16,
        default_start_step=1,
        default_start_layer=3,
    )
    measured = entry.with_shape(reported)
    assert (measured.block_count, measured.default_control) == (
        4,
        {"start_step": 1, "start_layer": 3},
    )
    # An older worker reports no default: the depth rule over the measured blocks.
    older = reported.model_copy(update={"default_start_layer": None, "default_start_step": None})
    assert entry.with_shape(older).default_control == {"start_step": 4, "start_layer": 2}
    # A declared default stays.
    declared = catalog_from_data(
        {
            "default": "f",
            "models": [
                {"name": "f", "source": "org/flux", "family": "flux", "default_start_layer": 1}
            ],
        }
    ).get("f")
    assert declared.with_shape(reported).default_start_layer == 1
