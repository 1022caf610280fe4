"""Model shapes: the default start layer as a rule over the depth, and entries that follow the
shape their model measures."""

from __future__ import annotations

import pytest

from masactrl_jobs.catalog import ModelEntry, checkpoint_entry
from masactrl_jobs.shape import ModelShape, default_start_layer


def shape(blocks: int, side: int = 64, multiple: int = 16, family: str = "sd") -> ModelShape:
    return ModelShape.model_validate(
        {
            "family": family,
            "block_count": blocks,
            "native_width": side,
            "native_height": side,
            "size_multiple": multiple,
            "prediction_type": "epsilon",
        }
    )


@pytest.mark.parametrize(
    ("blocks", "layer"), [(16, 10), (70, 44), (7, 4), (11, 7), (5, 3), (2, 1), (1, 0)]
)
def test_the_papers_start_layer_is_kept_at_the_same_depth(blocks: int, layer: int) -> None:
    assert default_start_layer(blocks) == layer


def test_the_rule_agrees_with_the_engines_library_fallback() -> None:
    from masactrl_core.runs import PAPER_START_DEPTH

    for blocks in range(1, 90):
        engine_rule = min(round(blocks * PAPER_START_DEPTH), blocks - 1)
        assert default_start_layer(blocks) == engine_rule


def test_an_entry_that_declares_nothing_follows_the_measured_model() -> None:
    entry = ModelEntry.model_validate({"name": "small", "source": "x", "family": "sd"})
    # Until a worker reports: the family's reference checkpoint, SD 1.5.
    assert (entry.block_count, entry.default_start_layer, entry.measured) == (16, 10, None)
    measured = entry.with_shape(shape(7))
    assert entry.shape_conflicts(shape(7)) == []
    assert (measured.block_count, measured.default_start_layer) == (7, 4)
    assert (measured.native_size, measured.size_multiple) == ((64, 64), 16)
    assert measured.max_pixels == 4 * 64 * 64
    assert measured.measured == shape(7)


def test_declared_values_stay_and_contradictions_are_named() -> None:
    entry = ModelEntry.model_validate(
        {
            "name": "small",
            "source": "x",
            "family": "sd",
            "block_count": 16,
            "default_start_layer": 9,
            "native_width": 64,
            "native_height": 64,
            "size_multiple": 16,
        }
    )
    assert entry.shape_conflicts(shape(7)) == [
        "small declares block_count 16, but the model measures 7",
        "small declares default_start_layer 9, but the model has 7 self-attention blocks",
    ]
    assert entry.shape_conflicts(shape(16, family="sdxl"))[0] == (
        "small is declared sd, but its checkpoint is sdxl"
    )
    assert entry.with_shape(shape(16)).default_start_layer == 9


def test_a_checkpoint_outside_a_catalog_takes_its_folders_declared_control(tmp_path) -> None:
    (tmp_path / "masactrl.json").write_text('{"start_step": 3, "start_layer": 5}')
    entry = checkpoint_entry("toy", str(tmp_path), "sd").with_shape(shape(7))
    assert (entry.default_start_step, entry.default_start_layer) == (3, 5)
    plain = checkpoint_entry("plain", str(tmp_path / "none"), "sd").with_shape(shape(7))
    assert (plain.default_start_step, plain.default_start_layer) == (4, 4)
