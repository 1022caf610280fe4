"""Every relative link and ``#anchor`` in README.md and docs/*.md resolves.

A link to a file must name one that exists; an anchor must match a heading's slug in the target
file as GitHub makes it. External URLs are not fetched: only their form is left alone.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HTML = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)=["']([^"']+)["']""", re.IGNORECASE)
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"""<a\s+(?:name|id)=["']([^"']+)["']""", re.IGNORECASE)


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked out of links' way."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file: heading slugs (repeats numbered -1, -2...) and HTML ids."""
    seen: Counter[str] = Counter()
    found = set()
    for line in _prose(path.read_text(encoding="utf-8")):
        found.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file, in order (inline code spans are not links)."""
    targets = []
    for line in _prose(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)
        targets += _INLINE_LINK.findall(line) + _HTML.findall(line)
        reference = _REFERENCE.match(line)
        if reference:
            targets.append(reference.group(1))
    return targets


def broken(path: Path) -> list[str]:
    """What in ``path`` points nowhere, one sentence each."""
    problems = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto:: never fetched
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor and destination.suffix == ".md" and unquote(anchor) not in anchors(destination):
            problems.append(f"{target}: no heading with that anchor in {destination.name}")
    return problems


def test_the_slugs_follow_github() -> None:
    assert slug("Redis failover") == "redis-failover"
    assert slug("`masactrl up`: the local stack") == "masactrl-up-the-local-stack"
    assert slug("What's in [the box](x.md)?") == "whats-in-the-box"
    assert slug("Workers & queues (GPU)") == "workers--queues-gpu"


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[ok](#title) [gone](missing.md) [bad](#nowhere) [web](https://x.invalid/)\n"
        "```\n[in code](also-missing.md)\n```\n"
    )
    assert broken(page) == [
        "missing.md: no such file",
        "#nowhere: no heading with that anchor in page.md",
    ]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(document: Path) -> None:
    assert broken(document) == []
