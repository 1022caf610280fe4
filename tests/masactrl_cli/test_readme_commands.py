"""The README's shell blocks for a running stack (the quick start's `make up` block, the HTTP API
and sequences over HTTP) run as written against a real ``masactrl up`` stack.

The stack runs on a private port and serves the tiny model (``MASACTRL_MODEL=tiny``, the shared
``local_stack``), so the one change made to the text is the gateway's address; ``make up`` and
``make down`` are the fixture's own. Everything else (``.venv/bin/masactrl``, ``examples/``,
``var/dev-api-key``) is found where the README says, from a working folder that links to them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.masactrl_cli.conftest import StackRun

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
DOCUMENTED_API = "http://127.0.0.1:8000"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.M)


def shell_blocks(section: str) -> list[str]:
    """The ```sh blocks under the heading ``section`` (up to the next heading of its level or
    above; a ``#`` line inside a block is a shell comment, not a heading)."""
    level = len(section.split(" ", 1)[0])
    blocks: list[str] = []
    inside, fence, current = False, None, []
    for line in README.read_text().splitlines():
        if fence is not None:
            if line.startswith("```"):
                if fence == "sh" and inside:
                    blocks.append("\n".join(current))
                fence, current = None, []
            else:
                current.append(line)
        elif line.startswith("```"):
            fence = line[3:].strip()
        elif line == section:
            inside = True
        elif inside and re.match(rf"#{{1,{level}}} ", line):
            break
    return blocks


def stack_blocks_elsewhere() -> list[str]:
    """The other ```sh blocks that call the stack's API on its tiny model (its layout, LoRA
    examples): every block holding ``$API`` and the model name ``tiny``."""
    sections = ("## The HTTP API", "### Sequences over HTTP")
    taken = {block.strip() for section in sections for block in shell_blocks(section)}
    everything = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    named_tiny = ('"model": "tiny"', '\\"model\\": \\"tiny\\"')
    return [
        block
        for block in everything
        if block.strip() not in taken
        and "$API" in block
        and any(name in block for name in named_tiny)
    ]


def test_the_sections_have_the_blocks_this_test_runs() -> None:
    # A renamed heading must not turn this file into a test of nothing.
    assert len(shell_blocks("## The HTTP API")) >= 2
    assert len(shell_blocks("### Sequences over HTTP")) == 1
    assert any("make up" in block for block in shell_blocks("## Quick start"))
    elsewhere = stack_blocks_elsewhere()
    assert any("loras" in block for block in elsewhere)
    assert any("condition" in block for block in elsewhere)


def _script() -> str:
    quick_start = [
        line
        for block in shell_blocks("## Quick start")
        if "make up" in block
        for line in block.splitlines()
        if not line.startswith(("make up", "make down"))
    ]
    blocks = ["\n".join(quick_start), *shell_blocks("## The HTTP API")]
    blocks += shell_blocks("### Sequences over HTTP")
    blocks += stack_blocks_elsewhere()
    return "\n".join(blocks)


@pytest.mark.slow
def test_the_readmes_commands_run_against_a_stack(local_stack: StackRun, tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(REPO_ROOT / "examples")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "var").symlink_to(local_stack.root / "var")
    script = _script().replace(DOCUMENTED_API, local_stack.api_url)
    env = {**local_stack.env, "MASACTRL_API_URL": local_stack.api_url}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert UUID.search(result.stdout), output  # `echo "$JOB"` printed a job id
    # curl exits 0 on a 4xx: a request the gateway refused shows in its answer instead (the
    # README's cancel of a finished job is a documented 409, not a refusal of the request).
    for refusal in ('"invalid_request"', '"not_found"', '"unauthorized"', '"payload_too_large"'):
        assert refusal not in result.stdout, output
    # The client commands wait for their jobs and exit 1 when one fails; these are their results.
    for run in ("try", "layout", "lora"):
        assert list((tmp_path / "out" / run).glob("*.png")), output
    assert (tmp_path / "out/clip/sequence.mp4").exists(), output
    assert (tmp_path / "clip/sequence.mp4").exists(), output
