"""Resolving a job's control and size against a catalog model: defaults, checks, field names."""

from __future__ import annotations

import pytest

from masactrl_jobs.catalog import default_catalog
from masactrl_jobs.control import (
    InvalidParameters,
    check_control,
    resolve_control,
    resolve_size,
)
from masactrl_jobs.schema import ControlInput, ControlParams, MaskControl, MaskMode

SD15 = default_catalog().get("sd15")
SDXL = default_catalog().get("sdxl")


def problems(error: pytest.ExceptionInfo[InvalidParameters]) -> dict[tuple[str | int, ...], str]:
    return {problem.field: problem.message for problem in error.value.problems}


def test_omitted_values_take_the_models_defaults_and_say_so() -> None:
    defaulted: list = ["start_step", "start_layer"]
    assert resolve_control(SD15, ControlParams(), 50) == ControlInput(
        start_step=4, start_layer=10, defaulted=defaulted
    )
    assert resolve_control(SDXL, ControlParams(), 50) == ControlInput(
        start_step=4, start_layer=44, defaulted=defaulted
    )
    assert resolve_control(SD15, ControlParams(start_layer=3), 50).defaulted == ["start_step"]


def test_start_step_equal_to_steps_runs_without_the_control_everywhere() -> None:
    resolved = resolve_control(SD15, ControlParams(start_step=25), 25)
    assert (resolved.start_step, resolved.defaulted) == (25, ["start_layer"])
    assert check_control(SD15, resolved, 25).start_step == 25
    assert resolve_control(SD15, ControlParams(steps=[]), 25).steps == []


def test_a_default_start_step_past_a_short_run_is_clipped() -> None:
    assert resolve_control(SD15, ControlParams(), 2).start_step == 2


def test_requested_values_and_lists_pass_through_with_the_mask() -> None:
    mask = MaskControl(mode=MaskMode.auto, source_word="cat", target_word="dog")
    requested = ControlParams(start_step=3, start_layer=60, layers=[60, 69], steps=[3, 19])
    resolved = resolve_control(SDXL, requested, 20, mask)
    assert resolved == ControlInput(
        start_step=3, start_layer=60, layers=[60, 69], steps=[3, 19], mask=mask
    )


def test_every_problem_is_reported_with_its_field() -> None:
    requested = ControlParams(start_step=11, start_layer=16, layers=[3, 16], steps=[9, 10])
    with pytest.raises(InvalidParameters) as caught:
        resolve_control(SD15, requested, 10)
    assert problems(caught) == {
        ("control", "start_step"): (
            "start_step must be between 0 and steps (10; equal to steps runs without the "
            "control), got 11"
        ),
        ("control", "steps"): "control steps must be below steps (10), got [10]",
        ("control", "start_layer"): (
            "start_layer must be less than 16 (sd15 has 16 transformer blocks), got 16"
        ),
        ("control", "layers"): "layers must be below 16 (sd15 has 16 transformer blocks), got [16]",
    }


@pytest.mark.parametrize(
    "requested", [ControlParams(), ControlParams(start_step=3, start_layer=12, layers=[12, 15])]
)
def test_a_checked_control_resolves_to_the_same_values(requested: ControlParams) -> None:
    # checked=True only skips looking for problems again (the gateway has reported them).
    assert resolve_control(SD15, requested, 20, checked=True) == resolve_control(
        SD15, requested, 20
    )
    assert resolve_size(SDXL, None, 896, checked=True) == resolve_size(SDXL, None, 896)


def test_a_control_shared_as_the_default_cannot_be_changed() -> None:
    # Every request without a control shares one default instance (schema.ControlParams).
    default = ControlParams()
    with pytest.raises(ValueError, match="frozen"):
        default.start_step = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="frozen"):
        default.mask.threshold = 0.5  # type: ignore[misc]


def test_the_worker_resolves_defaults_again_for_its_model_but_checks_requested_values() -> None:
    stored = resolve_control(SDXL, ControlParams(), 2)
    # start_step == steps: no controlled step, as resolved
    assert check_control(SDXL, stored, 2) == stored
    # The gateway knew another shape than the worker's model: its defaults follow the model.
    rebased = check_control(SD15, stored, 2)
    assert (rebased.start_step, rebased.start_layer) == (2, 10)
    requested = resolve_control(SDXL, ControlParams(start_layer=44), 2)
    with pytest.raises(InvalidParameters) as caught:
        check_control(SD15, requested, 2)
    assert list(problems(caught)) == [("control", "start_layer")]
    with pytest.raises(InvalidParameters, match="between 0 and steps"):
        check_control(SDXL, requested.model_copy(update={"start_step": 3, "defaulted": []}), 2)


def test_size_defaults_to_the_native_size() -> None:
    assert resolve_size(SD15, None, None) == (512, 512)
    assert resolve_size(SD15, 512, 768) == (512, 768)
    assert resolve_size(SDXL, 1024, 992) == (1024, 992)


def test_size_problems_name_the_field() -> None:
    with pytest.raises(InvalidParameters) as caught:
        resolve_size(SD15, None, 520)
    assert problems(caught) == {("height",): "height must be a multiple of 64 for sd15, got 520"}
    with pytest.raises(InvalidParameters) as caught:
        resolve_size(SD15, 1024, 1088)
    assert problems(caught) == {
        ("width",): "1024×1088 is 1114112 pixels; sd15 allows at most 1048576"
    }
    with pytest.raises(InvalidParameters) as caught:
        resolve_size(SD15, None, 2112)
    assert list(problems(caught)) == [("height",)]  # the side that was asked for
    with pytest.raises(InvalidParameters, match="width must be positive, got 0"):
        resolve_size(SD15, 0, 512)
