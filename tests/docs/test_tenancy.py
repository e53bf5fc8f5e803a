"""docs/tenancy.md: the `extproc envoy render --identity` command it shows is run, and
each Envoy YAML block it shows is part of what that command prints (with the example's
directory shown as /etc/asc/); the rendered bootstrap passes `envoy --mode validate`
once its certificate files exist."""

from __future__ import annotations

import contextlib
import io
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.cli import main
from extproc.devstack import envoy_binary, free_port
from tests.docs.markdown import REPO, blocks, is_part_of
from tests.identity_material import MeshPki

DOC = REPO / "docs" / "tenancy.md"
MARKER = "tests/docs/test_tenancy.py"


def marked_blocks(lang: str) -> list[Any]:
    return [block for block in blocks(DOC, lang)
            if block.marker is not None and block.marker.target == MARKER]


def render(command: str, monkeypatch: pytest.MonkeyPatch) -> str:
    argv = shlex.split(command)
    assert argv[:3] == ["extproc", "envoy", "render"]
    monkeypatch.chdir(REPO)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv[1:]) == 0
    return out.getvalue()


@pytest.fixture
def rendered(monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    (command,) = marked_blocks("sh")
    text = render(command.text.strip(), monkeypatch)
    return command.text.strip(), text


def test_every_envoy_block_is_part_of_the_rendered_bootstrap(
        rendered: tuple[str, str]) -> None:
    _, text = rendered
    shown_as = text.replace(f"{REPO / 'docs' / 'examples'}/", "/etc/asc/")
    whole = yaml.safe_load(shown_as)
    yaml_blocks = marked_blocks("yaml")
    assert len(yaml_blocks) == 2
    for block in yaml_blocks:
        assert is_part_of(yaml.safe_load(block.text), whole), block.where


def test_the_rendered_bootstrap_is_valid_for_envoy(rendered: tuple[str, str],
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    command, _ = rendered
    pki = MeshPki(tmp_path / "tls")
    real = (command.replace("/etc/asc/tls/envoy.crt", str(pki.server_cert))
            .replace("/etc/asc/tls/envoy.key", str(pki.server_key))
            .replace("/etc/asc/tls/mesh-ca.crt", str(pki.ca)))
    path = tmp_path / "envoy.yaml"
    path.write_text(render(real, monkeypatch), encoding="utf-8")
    done = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path),
                           "--base-id", str(free_port())],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_render_without_its_prerequisites_says_what_is_missing(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(REPO)
    assert main(["envoy", "render", "--config", "docs/examples/tenancy.yaml",
                 "--identity", "mesh"]) == 2
    assert capsys.readouterr().err == (
        "error: --identity mesh needs --mesh-port, --mesh-cert, --mesh-key "
        "and --mesh-client-ca (hint: `extproc envoy render --help` lists the options)\n")
    assert main(["envoy", "render", "--config", "docs/examples/routing.yaml",
                 "--identity", "jwt"]) == 2
    assert capsys.readouterr().err == (
        "error: --identity jwt needs `identity.jwt` (issuer, audiences, "
        "jwks_file) in the config (hint: `extproc envoy render --help` lists the options)\n")
