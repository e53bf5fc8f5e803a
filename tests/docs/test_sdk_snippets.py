"""Issue 16 item 8: every OpenAI / Anthropic SDK snippet in the docs runs, as written,
against a real stack (Envoy + extproc + the emulator), and prints what the docs say.

Snippets are extracted from the markdown at test time, so docs and tests cannot drift.
The only change made to a snippet is its address: the docs' Envoy address (quickstart:
`http://127.0.0.1:10000`, providers: `http://envoy.internal:10000`) becomes this stack's.
The stack's tenant `acme` holds the quickstart's demo key, so the key is used as written;
a snippet that leaves `VIRTUAL_KEY` to the reader gets it defined as that key first.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extproc.auth import hash_key
from extproc.devstack import Stack
from extproc.secrets import Secret
from tests.conftest import PEPPER, Gateway, gateway_config, start_gateway
from tests.docs.markdown import REPO, Block, blocks

DEMO_KEY = "sk-asc-demo-acme-key"
DOC_ADDRESSES = ("http://127.0.0.1:10000", "http://envoy.internal:10000")
SDK_IMPORT = re.compile(r"^\s*(import|from)\s+(openai|anthropic)\b", re.MULTILINE)
DOCS = sorted([*REPO.glob("docs/*.md"), REPO / "README.md"])
SNIPPETS = [block for doc in DOCS for block in blocks(doc, "python")
            if SDK_IMPORT.search(block.text)]


def snippet_config(emulator_port: int) -> dict[str, Any]:
    """The test gateway, with the demo key for acme and an Anthropic-kind model
    `claude-sonnet` (the providers.md snippet sends it through the OpenAI door)."""
    doc = gateway_config(emulator_port)
    doc["tenants"]["acme"]["keys"] = [{"id": "acme-demo",
                                        "hash": hash_key(Secret(PEPPER), DEMO_KEY)}]
    doc["providers"]["emu-anthropic"] = {
        "kind": "anthropic", "base_url": f"http://127.0.0.1:{emulator_port}",
        "region": "eu-central-1", "zone": "eu", "cluster": "emu_anthropic",
        "credentials": ["emu-eu-1"]}
    doc["models"]["claude-sonnet"] = {
        "price": {"input_per_mtok": 3, "output_per_mtok": 15},
        "deployments": [{"provider": "emu-anthropic", "model": "claude-sonnet-4-5"}]}
    doc["tenants"]["acme"]["models"].append("claude-sonnet")
    return doc


@pytest.fixture(scope="module")
def sdk_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("sdk")
    with Stack(workdir) as stack:
        yield start_gateway(stack, workdir / "config", document=snippet_config)


def run_snippet(block: Block, gateway: Gateway, tmp_path: Path) -> str:
    code = block.text
    for address in DOC_ADDRESSES:
        code = code.replace(address, gateway.base_url)
    assert code != block.text, f"{block.where}: the snippet names no known Envoy address"
    if "VIRTUAL_KEY" in code and "VIRTUAL_KEY =" not in code:
        code = f"VIRTUAL_KEY = {DEMO_KEY!r}\n" + code
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, check=False, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, ""), f"{block.where}: {done.stderr}"
    return done.stdout


def snippet(doc: str, first_line: str) -> Block:
    [block] = [b for b in SNIPPETS if b.path == REPO / doc and first_line in b.text]
    return block


def test_every_sdk_snippet_is_marked_as_run_here() -> None:
    assert len(SNIPPETS) == 3, [block.where for block in SNIPPETS]
    for block in SNIPPETS:
        assert block.marker is not None, block.where
        assert (block.marker.kind, block.marker.target) == (
            "tested", "tests/docs/test_sdk_snippets.py"), block.where


def test_quickstart_openai_snippet(sdk_gateway: Gateway, tmp_path: Path) -> None:
    out = run_snippet(snippet("docs/quickstart.md", "from openai import OpenAI"),
                      sdk_gateway, tmp_path)
    lines = out.split("\n")
    assert lines[:2] == ["Hello from the emulator.", "Hello from the emulator."], out
    assert re.fullmatch(r"emu-eu [0-9a-f]{32}", lines[2]), out
    assert lines[3:] == [""], out  # every print ends its line, the stream's too


def test_quickstart_anthropic_snippet(sdk_gateway: Gateway, tmp_path: Path) -> None:
    out = run_snippet(snippet("docs/quickstart.md", "import anthropic"), sdk_gateway,
                      tmp_path)
    assert out == ("Hello from the emulator. end_turn\n2 4\nHello from the emulator.\n"), out


def test_providers_snippet_crosses_doors(sdk_gateway: Gateway, tmp_path: Path) -> None:
    sdk_gateway.emulator.clear()
    out = run_snippet(snippet("docs/providers.md", "import openai, anthropic"), sdk_gateway,
                      tmp_path)
    assert out == ""
    paths = [(r["path"], json.loads(r["body"])["model"])
             for r in sdk_gateway.emulator.requests()]
    assert paths == [("/v1/messages", "claude-sonnet-4-5"),
                     ("/v1/chat/completions", "gpt-4o-mini-eu")]
