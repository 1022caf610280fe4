"""The supplementary's Fig. 1 ablation, in numbers, on the toy-world model.

    .venv/bin/python bench/ablation.py [--model models/toy-shapes] [--pairs 8] [--seeds 2]

For a grid of start steps × start layers, synthesise scene pairs (a source caption and a target
caption that changes the pose) over several noise seeds and score each cell: identity consistency
(1 - colour-histogram distance of the two creatures) and prompt compliance (the target's pose
attributes read back from the picture); see ``masactrl_toy.effect``. Then, at the model's default
control: synthesis and real-image editing of rendered scenes with MasaCtrl off, on, and on with the
anchored source; and the coarse check over ``examples.json`` (whole-image colour-histogram
distance with MasaCtrl on vs off, and total variation next to the random tiny checkpoint's).

Writes the heatmaps to ``--image`` (default docs/ablation.png), all numbers to ``--json`` and a
Markdown table to stdout. The paper's qualitative claim to compare with: control from too early
a step or layer keeps the source but ignores the prompt; from too late, follows the prompt but
loses the content.

    .venv/bin/python bench/ablation.py --edits [--choose-scenes 0,1,2,3] [--report-scenes 10,...,17]

chooses the real-image edit the demo shows instead (no grid, no heatmaps): each rendered scene
``random_scene(seed)`` of ``--choose-scenes`` is edited to itself with one pose attribute flipped
(arms, stance, facing: in place; position: a move), MasaCtrl on and off; the chosen attribute is
the one with the lowest on / off colour-histogram distance source -> target among those whose
target, with MasaCtrl, lies nearer the rendered ground truth than the source on most scenes. Every
attribute is then measured again on the fresh ``--report-scenes``, which played no part in the
choice, and the coarse check runs over all of ``examples.json`` at ``--coarse-seeds``.

    .venv/bin/python bench/ablation.py --coarse-only --coarse-seeds 10,11,12,13

runs the coarse check alone (it is the slowest part of either run on a CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from statistics import mean
from typing import Any

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import machine  # noqa: E402  (bench/core.py, next to this script)

from masactrl_toy.effect import (  # noqa: E402
    POSE_ATTRIBUTES,
    EditEffect,
    Scores,
    describe,
    edit_scores,
    in_place_edit_effect,
    synthesis_scores,
    total_variation,
)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "toy-shapes")
    parser.add_argument("--pairs", type=int, default=8, help="scene pairs (default 8)")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per pair (default 2)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--start-steps", type=_ints, default=[0, 4, 10, 25])
    parser.add_argument("--start-layers", type=_ints, default=[0, 5, 10, 13, 15])
    parser.add_argument("--image", type=Path, default=REPO / "docs" / "ablation.png")
    parser.add_argument("--json", type=Path, help="write every number here too")
    parser.add_argument(
        "--edits", action="store_true", help="choose the demo's in-place edit instead of the grid"
    )
    parser.add_argument("--choose-scenes", type=_ints, default=[0, 1, 2, 3])
    parser.add_argument("--report-scenes", type=_ints, default=list(range(10, 18)))
    parser.add_argument(
        "--coarse-seeds", type=_ints, help="noise seeds of the coarse check (default: --seeds')"
    )
    parser.add_argument("--coarse-only", action="store_true", help="only the coarse check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from masactrl_core import ControlConfig, MasaCtrlEngine

    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.monotonic()
    engine = MasaCtrlEngine.from_pretrained(args.model, device="cpu")
    # The model's default, its start step clipped to the run as the engine does for omitted values.
    default = replace(
        engine.default_control, start_step=min(engine.default_control.start_step, args.steps)
    )
    off = ControlConfig(start_step=args.steps, start_layer=default.start_layer)
    pairs, seeds = range(args.pairs), range(args.seeds)
    coarse_seeds = args.coarse_seeds if args.coarse_seeds is not None else list(seeds)
    if args.coarse_only:
        return _coarse_only(args, engine, default, off, coarse_seeds, started)
    if args.edits:
        return _edits(args, engine, default, off, coarse_seeds, started)
    print(f"# MasaCtrl ablation on {args.model.name} — {machine()}")
    print(
        f"{args.pairs} scene pairs × {args.seeds} seeds, {args.steps} DDIM steps, guidance 7.5; "
        f"default control: start step {default.start_step}, start layer {default.start_layer} "
        f"of {engine.block_count}\n",
        flush=True,
    )

    grid: dict[tuple[int, int], Scores] = {}
    for start_step in args.start_steps:
        for start_layer in args.start_layers:
            control = ControlConfig(start_step=start_step, start_layer=start_layer)
            grid[start_step, start_layer] = synthesis_scores(
                engine, pairs, seeds, control, steps=args.steps
            )
            print(
                f"  cell step {start_step:>2} layer {start_layer:>2}: "
                f"{describe(grid[start_step, start_layer])}",
                flush=True,
            )
    synthesis_off = synthesis_scores(engine, pairs, seeds, off, steps=args.steps)
    synthesis_on = synthesis_scores(engine, pairs, seeds, default, steps=args.steps)
    edits = {
        "off": edit_scores(engine, pairs, off, steps=args.steps),
        "on": edit_scores(engine, pairs, default, steps=args.steps),
        "on, anchored source": edit_scores(
            engine, pairs, default, steps=args.steps, anchor_source=True
        ),
    }
    coarse = _coarse_check(engine, args.model, coarse_seeds, default, off, args.steps)

    print(_grid_table(grid, synthesis_off, args.start_steps, args.start_layers))
    print(_defaults_table(synthesis_off, synthesis_on, edits))
    print(_coarse_line(coarse))
    _heatmaps(grid, synthesis_off, args.start_steps, args.start_layers, args.image)
    print(f"\nheatmaps: {args.image}; {time.monotonic() - started:.0f} s")
    _write_record(
        args,
        grid={f"{s},{layer}": asdict(v) for (s, layer), v in grid.items()},
        synthesis={"off": asdict(synthesis_off), "on": asdict(synthesis_on)},
        edit={k: asdict(v) for k, v in edits.items()},
        coarse=coarse,
    )
    return 0


def _edits(
    args: argparse.Namespace,
    engine: Any,
    on: Any,
    off: Any,
    coarse_seeds: list[int],
    started: float,
) -> int:
    """Choose the demo's in-place edit on some renders, report it on fresh ones (module doc)."""
    print(
        f"# The demo's real-image edit on {args.model.name} — {machine()}\n"
        f"{args.steps} DDIM steps, guidance 7.5, control on = start step {on.start_step}, "
        f"start layer {on.start_layer}; off = no step\n",
        flush=True,
    )
    measured: dict[str, dict[str, dict[str, EditEffect]]] = {}
    for phase, scenes in (("choose", args.choose_scenes), ("report", args.report_scenes)):
        measured[phase] = {}
        for attribute in POSE_ATTRIBUTES:
            measured[phase][attribute] = {
                name: in_place_edit_effect(engine, scenes, attribute, control, steps=args.steps)
                for name, control in (("on", on), ("off", off))
            }
        if phase == "choose":
            chosen = _choose(measured["choose"])
        print(_edits_table(phase, scenes, measured[phase], chosen), flush=True)
    print(f"\nchosen: **{chosen}** (on the choice scenes {args.choose_scenes} only)")
    coarse = _coarse_check(engine, args.model, coarse_seeds, on, off, args.steps)
    print("\n" + _coarse_line(coarse))
    print(f"\n{time.monotonic() - started:.0f} s")
    _write_record(
        args,
        chosen=chosen,
        edits={
            phase: {
                attribute: {name: asdict(effect) for name, effect in controls.items()}
                for attribute, controls in by_attribute.items()
            }
            for phase, by_attribute in measured.items()
        },
        coarse=coarse,
    )
    return 0


def _coarse_only(
    args: argparse.Namespace,
    engine: Any,
    on: Any,
    off: Any,
    coarse_seeds: list[int],
    started: float,
) -> int:
    print(
        f"# The coarse check on {args.model.name} — {machine()}\n"
        f"{args.steps} DDIM steps, guidance 7.5, control on = start step {on.start_step}, "
        f"start layer {on.start_layer}; off = no step\n",
        flush=True,
    )
    coarse = _coarse_check(engine, args.model, coarse_seeds, on, off, args.steps)
    print(_coarse_line(coarse))
    print(f"\n{time.monotonic() - started:.0f} s")
    _write_record(args, coarse=coarse)
    return 0


def _write_record(args: argparse.Namespace, **numbers: Any) -> None:
    """Every number of the run, with the machine and the arguments, to ``--json`` if given."""
    if args.json:
        record = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps(record | numbers, indent=2) + "\n")


def _ratio(effects: dict[str, EditEffect]) -> float:
    return effects["on"].image / max(effects["off"].image, 1e-9)


def _choose(by_attribute: dict[str, dict[str, EditEffect]]) -> str:
    """Lowest on / off ratio among the edits that follow their prompt with MasaCtrl on."""
    following = [a for a, effects in by_attribute.items() if effects["on"].follows > 0.5]
    return min(following or list(by_attribute), key=lambda a: _ratio(by_attribute[a]))


def _edits_table(
    phase: str, scenes: list[int], by_attribute: dict[str, dict[str, EditEffect]], chosen: str
) -> str:
    what = "choice" if phase == "choose" else "fresh, not used to choose"
    lines = [
        f"\nIn-place edits of random_scene({', '.join(map(str, scenes))}) ({what}):"
        " colour-histogram distance source -> target (↓ keeps the source), pixel distance of"
        " the target to the rendered ground truth (↓ follows the prompt), share of targets"
        " nearer the truth than the source:\n",
        "| flipped | hist. on | hist. off | on / off | to truth on | to truth off "
        "| nearer truth on | nearer truth off |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for attribute, effects in by_attribute.items():
        on, off = effects["on"], effects["off"]
        mark = " (chosen)" if attribute == chosen else ""
        lines.append(
            f"| {attribute}{mark} | {on.image:.4f} | {off.image:.4f} | {_ratio(effects):.2f}× | "
            f"{on.to_truth:.4f} | {off.to_truth:.4f} | {on.follows:.2f} | {off.follows:.2f} |"
        )
    return "\n".join(lines)


def _coarse_line(coarse: dict[str, Any]) -> str:
    return (
        f"Coarse check over examples.json ({coarse['pairs']} pairs × seeds "
        f"{coarse['seeds']}): whole-image colour-histogram distance on / off = "
        f"{coarse['image_on']:.4f} / {coarse['image_off']:.4f} = **{coarse['image_ratio']:.2f}×** "
        f"(creature only: {coarse['creature_ratio']:.2f}×); total variation "
        f"{coarse['tv_toy']:.4f} vs the random tiny checkpoint's {coarse['tv_tiny']:.4f}."
    )


def _coarse_check(
    engine: Any, model: Path, seeds: list[int], on: Any, off: Any, steps: int
) -> dict[str, Any]:
    """The issue's outside check: examples.json pairs, whole-image histograms, on vs off."""
    from masactrl_core import MasaCtrlEngine
    from masactrl_core.tiny import write_tiny_checkpoint
    from masactrl_toy.measures import foreground_mask, histogram_distance
    from masactrl_toy.world import BACKGROUNDS

    examples = json.loads((model / "examples.json").read_text())
    distances: dict[str, list[float]] = {"image_on": [], "image_off": [], "c_on": [], "c_off": []}
    tv_toy = []
    for example in examples:
        background = next(b for b in BACKGROUNDS if f"on {b} " in example["target_prompt"] + " ")
        for seed in seeds:
            for name, control in (("on", on), ("off", off)):
                result = engine.synthesize(
                    example["source_prompt"],
                    [example["target_prompt"]],
                    seed=seed,
                    steps=steps,
                    control=control,
                )
                a, b = result.source, result.targets[0]
                distances[f"image_{name}"].append(histogram_distance(a, b))
                distances[f"c_{name}"].append(
                    histogram_distance(
                        a, b, foreground_mask(a, background), foreground_mask(b, background)
                    )
                )
                tv_toy.append(total_variation(b))
    with tempfile.TemporaryDirectory(prefix="masactrl-ablation-") as tmp:
        write_tiny_checkpoint(Path(tmp) / "tiny")
        tiny = MasaCtrlEngine.from_pretrained(Path(tmp) / "tiny", device="cpu")
        tv_tiny = []
        for seed in seeds:
            drawn = tiny.synthesize(
                examples[0]["source_prompt"], [examples[0]["target_prompt"]], seed=seed, steps=10
            )
            tv_tiny += [total_variation(image) for image in (drawn.source, *drawn.targets)]
    result = {key: mean(values) for key, values in distances.items()}
    return {
        "pairs": len(examples),
        "seeds": seeds,
        "image_on": result["image_on"],
        "image_off": result["image_off"],
        "image_ratio": result["image_on"] / max(result["image_off"], 1e-9),
        "creature_ratio": result["c_on"] / max(result["c_off"], 1e-9),
        "tv_toy": mean(tv_toy),
        "tv_tiny": mean(tv_tiny),
    }


def _grid_table(
    grid: dict[tuple[int, int], Scores], off: Scores, steps: list[int], layers: list[int]
) -> str:
    lines = [
        "\nSynthesis, identity consistency / compliance with the changed pose attributes, per start"
        " step (rows) × start layer (columns):\n",
        "| start step | " + " | ".join(f"layer {layer}" for layer in layers) + " |",
        "|---|" + "---:|" * len(layers),
    ]
    for step in steps:
        cells = [
            f"{grid[step, layer].consistency:.2f} / {grid[step, layer].change:.2f}"
            for layer in layers
        ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append(f"| off | {off.consistency:.2f} / {off.change:.2f} (any layer) |")
    return "\n".join(lines)


def _defaults_table(off: Scores, on: Scores, edits: dict[str, Scores]) -> str:
    lines = [
        "\nAt the default control (consistency ↑, colour distance ↓, compliance ↑):\n",
        "| task | MasaCtrl | consistency | mean-colour distance | compliance: all / changed |",
        "|---|---|---:|---:|---:|",
    ]
    rows = [("synthesis", "off", off), ("synthesis", "on", on)]
    rows += [("edit of a rendered scene", name, scores) for name, scores in edits.items()]
    for task, name, s in rows:
        lines.append(
            f"| {task} | {name} | {s.consistency:.3f} | {s.colour:.3f} | "
            f"{s.compliance:.3f} / {s.change:.3f} |"
        )
    return "\n".join(lines)


_CELL = 56


def _heatmaps(
    grid: dict[tuple[int, int], Scores],
    off: Scores,
    steps: list[int],
    layers: list[int],
    path: Path,
) -> None:
    """Two panels (consistency, compliance): rows start steps, then "off"; columns start layers."""
    panels = [("identity consistency", "consistency"), ("changed-pose compliance", "change")]
    rows = [*steps, None]
    left, top, gap = 70, 40, 30
    panel_w = len(layers) * _CELL
    image = Image.new("RGB", (left + 2 * panel_w + gap + 10, top + len(rows) * _CELL + 40), "white")
    draw = ImageDraw.Draw(image)
    for p, (title, key) in enumerate(panels):
        x0 = left + p * (panel_w + gap)
        values = [getattr(s, key) for s in grid.values()] + [getattr(off, key)]
        low, high = min(values), max(values)
        draw.text((x0, 8), title, fill="black")
        for c, layer in enumerate(layers):
            draw.text((x0 + c * _CELL + 8, top + len(rows) * _CELL + 6), f"L{layer}", fill="black")
        for r, step in enumerate(rows):
            if p == 0:
                label = "off" if step is None else f"S{step}"
                draw.text((10, top + r * _CELL + _CELL // 2 - 6), label, fill="black")
            for c, layer in enumerate(layers):
                value = getattr(off if step is None else grid[step, layer], key)
                share = 0.5 if high == low else (value - low) / (high - low)
                box = (
                    x0 + c * _CELL,
                    top + r * _CELL,
                    x0 + (c + 1) * _CELL - 2,
                    top + (r + 1) * _CELL - 2,
                )
                draw.rectangle(box, fill=_colour(share))
                draw.text(
                    (box[0] + 10, box[1] + _CELL // 2 - 6),
                    f"{value:.2f}",
                    fill="white" if share < 0.6 else "black",
                )
    draw.text((10, top + len(rows) * _CELL + 22), "S: start step, L: start layer", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _colour(share: float) -> tuple[int, int, int]:
    """Dark blue (low) to yellow (high), through teal: readable in print and for most eyes."""
    stops = [(40, 30, 110), (30, 140, 140), (250, 220, 50)]
    scaled = share * (len(stops) - 1)
    i = min(int(scaled), len(stops) - 2)
    t = scaled - i
    a, b = stops[i], stops[i + 1]
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


if __name__ == "__main__":
    sys.exit(main())
