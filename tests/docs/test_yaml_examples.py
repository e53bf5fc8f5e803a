"""Issue 16 item 7: every ```yaml block of the docs (docs/*.md, docs/decisions/*.md,
README.md) is a complete config under docs/examples/ (byte for byte) or a marked fragment
of one, and every such config passes `extproc check-config` -- so a snippet cannot name a
field, value or shape the gateway would refuse. A block that a named test adds to a config and runs
(`tested by`, the cookbook's) is checked by that test; a yaml block that is not a gateway
config at all (an Envoy route) may be `illustrative`. The markers are described in
tests/docs/markdown.py; tests/docs/test_every_block_is_marked.py checks that every other
block is tested or illustrative."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.docs.markdown import REPO, Block, blocks, is_part_of

DOCS = sorted([*REPO.glob("docs/*.md"), *REPO.glob("docs/decisions/*.md"),
               REPO / "README.md"])
EXAMPLES = sorted((REPO / "docs/examples").glob("*.yaml"))
YAML_BLOCKS = [block for doc in DOCS for block in blocks(doc, "yaml")]
GATEWAY_KEYS = set(json.loads((REPO / "deploy/schema/asc.schema.json").read_text(
    encoding="utf-8"))["properties"])
"""Top-level keys of a gateway config: a block using any of them is not illustrative."""


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_every_example_config_passes_check_config(example: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(example)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.startswith(f"{example}: ok (")


@pytest.mark.parametrize("example", ["credentials-file-kek.yaml", "credentials-transit.yaml"])
def test_credentials_examples_are_one_tenant_one_provider_one_model(example: str) -> None:
    """docs/credentials.md shows these two whole files; check-config's exact verdict."""
    path = REPO / "docs" / "examples" / example
    done = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, f"{path}: ok (1 tenants, 1 providers, 1 models)\n", "")


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=lambda block: block.where)
def test_every_yaml_block_is_an_example_or_a_marked_fragment(block: Block) -> None:
    hint = (f"{block.where}: put `<!-- example: docs/examples/X.yaml -->` or "
            "`<!-- fragment of docs/examples/X.yaml -->` before this block")
    assert block.marker is not None, hint
    if block.marker.kind == "tested":  # a test applies it to a config and runs it
        return
    if block.marker.kind == "illustrative":
        shown = yaml.safe_load(block.text)
        assert isinstance(shown, dict), hint
        assert not GATEWAY_KEYS & set(shown), hint
        return
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
    assert len(YAML_BLOCKS) >= 20
    assert {"docs/credentials.md", "docs/routing.md", "docs/budgets.md"} <= {
        block.path.relative_to(REPO).as_posix() for block in YAML_BLOCKS}
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

