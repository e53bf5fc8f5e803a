"""Fenced code blocks of the docs, with the marker that says how each one is checked.

The marker convention (shared by every test under tests/docs/): an HTML comment on its
own line directly before a fenced block (blank lines between them are allowed):

* `<!-- example: docs/examples/NAME.yaml -->` -- the block is that whole file, byte for
  byte; the file is a complete config that `extproc check-config` accepts.
* `<!-- fragment of docs/examples/NAME.yaml -->` -- the block is a part of that complete
  config: every key and value it shows is in the file (lists: each item is part of some
  item of the file's list).
* `<!-- tested by tests/docs/test_NAME.py -->` -- a command or SDK block that the named
  test extracts from the markdown and runs (so the two cannot drift).
* `<!-- illustrative -->` -- shown for reading only (an output, a shape with
  placeholders); no test runs it.

HTML comments do not render, so readers see plain blocks. Every fenced block of
docs/*.md, docs/decisions/*.md and README.md must carry one of these markers, with a real
target: tests/docs/test_every_block_is_marked.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["REPO", "Block", "Marker", "blocks", "is_part_of"]

REPO = Path(__file__).resolve().parents[2]

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(
    r"^<!--\s*(?P<kind>example:|fragment of|tested by|illustrative)\s*(?P<target>\S*)\s*-->\s*$")


@dataclass(frozen=True, slots=True)
class Marker:
    kind: str
    """'example', 'fragment', 'tested' or 'illustrative'."""
    target: str
    """A repository-relative path ('' for illustrative)."""


@dataclass(frozen=True, slots=True)
class Block:
    path: Path
    line: int
    """1-based line of the opening fence, for error messages."""
    lang: str
    text: str
    marker: Marker | None
    heading: str = ""
    """The nearest `#` heading above the block (its text), to find a block by section."""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


_KINDS = {"example:": "example", "fragment of": "fragment", "tested by": "tested",
          "illustrative": "illustrative"}


def blocks(path: Path, lang: str | None = None) -> list[Block]:
    """Every fenced block of `path` (only those whose info string starts with `lang`)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    marker: Marker | None = None
    heading = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        comment = _MARKER.match(line.strip())
        fence = _FENCE.match(line)
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if comment:
            marker = Marker(_KINDS[comment["kind"]], comment["target"])
        elif fence:
            close, start = fence["fence"], index
            body: list[str] = []
            index += 1
            indent = len(fence["indent"])
            while index < len(lines) and not lines[index].strip().startswith(close):
                text_line = lines[index]
                # A fence indented in a list item: its lines carry the same indent.
                body.append(text_line[indent:] if text_line.startswith(" " * indent) else
                            text_line.lstrip())
                index += 1
            info = fence["info"].strip().split()
            block_lang = info[0] if info else ""
            if lang is None or block_lang == lang:
                text = "\n".join(body) + "\n" if body else ""
                found.append(Block(path, start + 1, block_lang, text, marker, heading))
            marker = None
        elif line.strip():
            marker = None
        index += 1
    return found


def is_part_of(fragment: Any, whole: Any) -> bool:
    """True when every key and value of `fragment` is in `whole` (parsed YAML)."""
    if isinstance(fragment, dict):
        return isinstance(whole, dict) and all(
            key in whole and is_part_of(value, whole[key]) for key, value in fragment.items())
    if isinstance(fragment, list):
        return isinstance(whole, list) and all(
            any(is_part_of(item, candidate) for candidate in whole) for item in fragment)
    return bool(fragment == whole)
