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
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from statistics import mean
from typing import Any

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import machine  # noqa: E402  (bench/core.py, next to this script)

from masactrl_toy.effect import (  # noqa: E402
    Scores,
    describe,
    edit_scores,
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from masactrl_core import ControlConfig, MasaCtrlEngine

    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.monotonic()
    engine = MasaCtrlEngine.from_pretrained(args.model, device="cpu")
    default = engine.default_control
    off = ControlConfig(start_step=args.steps, start_layer=default.start_layer)
    pairs, seeds = range(args.pairs), range(args.seeds)
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
    coarse = _coarse_check(engine, args.model, seeds, default, off, args.steps)

    print(_grid_table(grid, synthesis_off, args.start_steps, args.start_layers))
    print(_defaults_table(synthesis_off, synthesis_on, edits))
    print(
        f"\nCoarse check over examples.json ({coarse['pairs']} pairs × {args.seeds} seeds): "
        f"whole-image colour-histogram distance on / off = {coarse['image_on']:.4f} / "
        f"{coarse['image_off']:.4f} = **{coarse['image_ratio']:.2f}×** (creature only: "
        f"{coarse['creature_ratio']:.2f}×); total variation {coarse['tv_toy']:.4f} vs the random "
        f"tiny checkpoint's {coarse['tv_tiny']:.4f}."
    )
    _heatmaps(grid, synthesis_off, args.start_steps, args.start_layers, args.image)
    print(f"\nheatmaps: {args.image}; {time.monotonic() - started:.0f} s")
    if args.json:
        record = {
            "machine": machine(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "grid": {f"{s},{layer}": asdict(v) for (s, layer), v in grid.items()},
            "synthesis": {"off": asdict(synthesis_off), "on": asdict(synthesis_on)},
            "edit": {k: asdict(v) for k, v in edits.items()},
            "coarse": coarse,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _coarse_check(
    engine: Any, model: Path, seeds: range, on: Any, off: Any, steps: int
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
        tv_tiny = [
            total_variation(image)
            for seed in seeds
            for image in tiny.synthesize(
                examples[0]["source_prompt"], [examples[0]["target_prompt"]], seed=seed, steps=10
            ).images
        ]
    result = {key: mean(values) for key, values in distances.items()}
    return {
        "pairs": len(examples),
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
        "\nSynthesis, consistency / compliance per start step (rows) × start layer (columns):\n",
        "| start step | " + " | ".join(f"layer {layer}" for layer in layers) + " |",
        "|---|" + "---:|" * len(layers),
    ]
    for step in steps:
        cells = [
            f"{grid[step, layer].consistency:.2f} / {grid[step, layer].compliance:.2f}"
            for layer in layers
        ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append(f"| off | {off.consistency:.2f} / {off.compliance:.2f} (any layer) |")
    return "\n".join(lines)


def _defaults_table(off: Scores, on: Scores, edits: dict[str, Scores]) -> str:
    lines = [
        "\nAt the default control (consistency ↑, colour distance ↓, compliance ↑):\n",
        "| task | MasaCtrl | consistency | mean-colour distance | compliance |",
        "|---|---|---:|---:|---:|",
    ]
    rows = [("synthesis", "off", off), ("synthesis", "on", on)]
    rows += [("edit of a rendered scene", name, scores) for name, scores in edits.items()]
    for task, name, s in rows:
        lines.append(
            f"| {task} | {name} | {s.consistency:.3f} | {s.colour:.3f} | {s.compliance:.3f} |"
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
    panels = [("identity consistency", "consistency"), ("prompt compliance", "compliance")]
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
