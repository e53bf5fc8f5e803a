"""Issue 16 item 7 for docs/credentials.md, docs/quickstart.md and docs/operator-guide.md:
every ```yaml block is a complete config under docs/examples/ (byte for byte, marked
`<!-- example: docs/examples/X.yaml -->`) or a marked fragment of one
(`<!-- fragment of docs/examples/X.yaml -->`: every key and value it shows is in that
file), and each of those configs passes `extproc check-config`. Same marker convention as
the other docs' test (tests/docs/test_yaml_examples.py on the cookbook16 branch).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docs.ops_harness import REPO

DOCS = ("docs/credentials.md", "docs/quickstart.md", "docs/operator-guide.md")
_BLOCK = re.compile(r"(?:^<!--\s*(example:|fragment of)\s*(\S+)\s*-->\n\n?)?^(\s*)```yaml\n"
                    r"(.*?)^\3```", re.MULTILINE | re.DOTALL)


def yaml_blocks() -> list[tuple[str, str, str, str]]:
    """(doc:line, marker kind, target, text) of every yaml block of DOCS."""
    found = []
    for doc in DOCS:
        text = (REPO / doc).read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start(3)) + 1
            found.append((f"{doc}:{line}", match.group(1) or "", match.group(2) or "",
                          match.group(4)))
    return found


def is_part_of(fragment: Any, whole: Any) -> bool:
    if isinstance(fragment, dict):
        return isinstance(whole, dict) and all(
            key in whole and is_part_of(value, whole[key]) for key, value in fragment.items())
    if isinstance(fragment, list):
        return isinstance(whole, list) and all(
            any(is_part_of(item, candidate) for candidate in whole) for item in fragment)
    return bool(fragment == whole)


def test_the_blocks_are_found() -> None:
    assert [where.split(":")[0] for where, *_ in yaml_blocks()] == ["docs/credentials.md"] * 3
    assert not is_part_of({"secrets": {"kek": {"backend": "file"}}},
                          {"secrets": {"kek": {"backend": "transit"}}})


@pytest.mark.parametrize("example", ["credentials-file-kek.yaml", "credentials-transit.yaml"])
def test_example_passes_check_config(example: str) -> None:
    path = REPO / "docs" / "examples" / example
    done = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, f"{path}: ok (1 tenants, 1 providers, 1 models)\n", "")


@pytest.mark.parametrize(("where", "kind", "target", "text"), yaml_blocks(),
                         ids=[b[0] for b in yaml_blocks()])
def test_yaml_block_is_an_example_or_a_fragment(where: str, kind: str, target: str,
                                                text: str) -> None:
    assert kind in ("example:", "fragment of"), f"{where}: unmarked yaml block"
    path: Path = REPO / target
    assert path.parent == REPO / "docs" / "examples", where
    assert path.exists(), where
    whole = path.read_text(encoding="utf-8")
    if kind == "example:":
        assert text == whole, where
    else:
        assert is_part_of(yaml.safe_load(text), yaml.safe_load(whole)), (
            f"{where}: a key or value of this block is not in {target}")


def test_every_command_block_of_credentials_md_is_tested_or_illustrative() -> None:
    """"Every command block in docs/ is either executed by a test or marked as
    illustrative" (issue 16), for docs/credentials.md; a named test must exist."""
    text = (REPO / "docs" / "credentials.md").read_text(encoding="utf-8")
    markers = re.findall(r"^(?:<!--\s*(.*?)\s*-->\n\n?)?```sh\n", text, re.MULTILINE)
    assert len(markers) >= 14
    for marker in markers:
        assert marker == "illustrative" or marker.startswith("tested by "), markers
        if marker.startswith("tested by "):
            assert (REPO / marker.removeprefix("tested by ")).exists(), marker
