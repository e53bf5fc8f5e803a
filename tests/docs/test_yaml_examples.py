"""Issue 16 item 7: every ```yaml block of the operator docs is a complete config under
docs/examples/ (byte for byte) or a marked fragment of one, and every such config passes
`extproc check-config` -- so a snippet cannot name a field, value or shape the gateway
would refuse. The markers are described in tests/docs/markdown.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.docs.markdown import REPO, Block, blocks, is_part_of

DOCS = ("docs/budgets.md", "docs/providers.md", "docs/config-reference.md", "README.md")
EXAMPLES = sorted((REPO / "docs/examples").glob("*.yaml"))
YAML_BLOCKS = [block for doc in DOCS for block in blocks(REPO / doc, "yaml")]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_every_example_config_passes_check_config(example: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(example)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.startswith(f"{example}: ok (")


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=lambda block: block.where)
def test_every_yaml_block_is_an_example_or_a_marked_fragment(block: Block) -> None:
    hint = (f"{block.where}: put `<!-- example: docs/examples/X.yaml -->` or "
            "`<!-- fragment of docs/examples/X.yaml -->` before this block")
    assert block.marker is not None, hint
    assert block.marker.kind in ("example", "fragment"), hint
    target = REPO / block.marker.target
    assert target in EXAMPLES, f"{block.where}: {block.marker.target} is not in docs/examples/"
    whole = target.read_text(encoding="utf-8")
    if block.marker.kind == "example":
        assert block.text == whole
        return
    fragment = yaml.safe_load(block.text)
    if fragment is None:  # comments only: each line is a line of the file
        assert set(block.text.splitlines()) <= set(whole.splitlines()), block.where
        return
    assert is_part_of(fragment, yaml.safe_load(whole)), (
        f"{block.where}: some key or value of this block is not in {block.marker.target}")


def test_the_marker_rule_finds_blocks() -> None:
    """Guards the parser: the docs do have yaml blocks, and an unmarked one is caught."""
    assert len(YAML_BLOCKS) >= 15
    assert not is_part_of({"tenants": {"acme": {"zone": "us"}}},
                          {"tenants": {"acme": {"zone": "eu", "models": []}}})
    assert is_part_of({"a": [{"b": 1}]}, {"a": [{"b": 2}, {"b": 1, "c": 3}], "d": 4})


def test_check_config_output_shown_in_the_reference_is_real() -> None:
    """The reference's `check-config broken.yaml` session, run on
    docs/examples/invalid/broken.yaml: same problems, lines, hints, order; exit 1."""
    [session] = [block for block in blocks(REPO / "docs/config-reference.md", "text")
                 if block.marker is not None and block.marker.kind == "tested"]
    command, _, expected = session.text.partition("\n")
    assert command == "$ extproc check-config broken.yaml"
    done = subprocess.run([sys.executable, "-m", "extproc", "check-config", "broken.yaml"],
                          cwd=REPO / "docs/examples/invalid", capture_output=True,
                          text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout + done.stderr) == (1, expected)


MY_DOCS = (*DOCS, "docs/operator-cookbook.md")


@pytest.mark.parametrize("block", [block for doc in MY_DOCS for block in blocks(REPO / doc)
                                   if block.lang != "yaml"], ids=lambda block: block.where)
def test_every_other_block_is_tested_or_illustrative(block: Block) -> None:
    """Command, code and output blocks: run by the named test, or marked illustrative."""
    assert block.marker is not None, f"{block.where}: mark it tested or illustrative"
    assert block.marker.kind in ("tested", "illustrative"), block.where
    if block.marker.kind == "tested":
        test = REPO / block.marker.target
        assert test.is_file(), block.where
        doc = block.path.relative_to(REPO).as_posix()
        assert doc in test.read_text(encoding="utf-8"), f"{block.where}: {test} never reads it"
