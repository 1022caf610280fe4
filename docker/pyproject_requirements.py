"""Print the dependencies that pyproject.toml declares, one requirement a line.

The image builds install these first, from pyproject.toml alone, so the slow dependency layer
(torch for the worker) is rebuilt only when the dependencies change, not on every source edit:

    python pyproject_requirements.py               # base: what the gateway needs (never torch)
    python pyproject_requirements.py --extra ml    # base plus the ML stack, for GPU workers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tomllib


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(
            f"{pyproject} has no extra {', '.join(unknown)}; known: {sorted(optional)}"
        )
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines.extend(optional[extra])
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--extra", action="append", default=[], help="add an extra's dependencies")
    args = parser.parse_args(argv)
    sys.stdout.write("".join(f"{line}\n" for line in requirements(args.pyproject, args.extra)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
