"""`extproc envoy render --shape ...` against Envoy itself: every shape's output passes
`envoy --mode validate`, and each committed example in envoy/ is byte for byte what the
command named in its header renders (run from the repository root)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from extproc.cli import main as extproc_cli
from extproc.devstack import envoy_binary, free_port
from extproc.envoy_bootstrap import Shape

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = {
    Shape.FRONT: REPO / "envoy" / "envoy.yaml",
    Shape.SIDECAR: REPO / "envoy" / "envoy-sidecar.yaml",
    Shape.EDGE: REPO / "envoy" / "envoy-edge.yaml",
}
_REGENERATE = "# Regenerate: "


def regenerate_command(path: Path) -> list[str]:
    """The `extproc envoy render ...` words from the file's second line."""
    second = path.read_text(encoding="utf-8").splitlines()[1]
    assert second.startswith(_REGENERATE), second
    words = shlex.split(second.removeprefix(_REGENERATE))
    assert words[:3] == ["extproc", "envoy", "render"]
    return words[1:]


def envoy_validate(path: Path, workdir: Path) -> str:
    completed = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--base-id", str(free_port())],
        capture_output=True, text=True, timeout=60, cwd=workdir, check=False)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert f"configuration '{path}' OK" in output
    return output


@pytest.mark.parametrize("shape", list(Shape))
def test_every_shape_passes_envoy_validate(shape: Shape, tmp_path: Path) -> None:
    # The config with TLS, HTTP/2-capable and plain-HTTP providers and failover clusters.
    output = tmp_path / f"{shape.value}.yaml"
    assert extproc_cli(["envoy", "render", "--shape", shape.value, "--config",
                        str(REPO / "docs" / "examples" / "full.yaml"), "--output",
                        str(output), "--extproc-workers", "2",
                        *(["--extproc-socket", "/run/asc/extproc.sock"]
                          if shape is Shape.EDGE else [])]) == 0
    envoy_validate(output, tmp_path)


@pytest.mark.parametrize("shape", list(Shape))
def test_every_shape_with_the_fast_path_passes_envoy_validate(shape: Shape,
                                                              tmp_path: Path) -> None:
    # full.yaml lets acme use the fast path: the fast door (ext_authz over HTTP, TCP or one
    # Unix socket per worker), its header_to_metadata rules, the fast routes.
    output = tmp_path / f"{shape.value}.yaml"
    assert extproc_cli(["envoy", "render", "--shape", shape.value, "--config",
                        str(REPO / "docs" / "examples" / "full.yaml"), "--output",
                        str(output), "--extproc-workers", "2"]) == 0
    text = output.read_text(encoding="utf-8")
    assert "asc.fast_door" in text
    if shape is Shape.SIDECAR:
        assert "/run/asc/extproc-0.sock.door" in text
        assert "/run/asc/extproc-1.sock.door" in text
    envoy_validate(output, tmp_path)


@pytest.mark.parametrize("shape", list(Shape))
def test_committed_example_is_what_render_produces(shape: Shape, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    example = EXAMPLES[shape]
    argv = regenerate_command(example)
    assert argv[argv.index("--shape") + 1] == shape.value
    monkeypatch.chdir(REPO)  # the header names the config relative to the repository
    rendered = tmp_path / example.name
    assert extproc_cli([*argv, "--output", str(rendered)]) == 0
    assert example.read_text(encoding="utf-8") == rendered.read_text(encoding="utf-8")


def test_every_rendered_example_in_envoy_is_covered() -> None:
    rendered = {p for p in (REPO / "envoy").glob("*.yaml")
                if p.read_text(encoding="utf-8").startswith("# Rendered by")}
    assert rendered == set(EXAMPLES.values())


def test_envoy_refuses_an_edge_shape_it_would_not_start(tmp_path: Path) -> None:
    """The validation above can fail: the same check refuses a broken overload manager."""
    broken = REPO / "envoy" / "envoy-edge.yaml"
    text = broken.read_text(encoding="utf-8").replace(
        "max_active_downstream_connections: 10000", "max_active_downstream_connections: 0")
    assert text != broken.read_text(encoding="utf-8")
    path = tmp_path / "broken-edge.yaml"
    path.write_text(text, encoding="utf-8")
    completed = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--base-id", str(free_port())],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert completed.returncode == 1
    assert ("DownstreamConnectionsConfigValidationError.MaxActiveDownstreamConnections: value"
            " must be greater than 0") in completed.stdout + completed.stderr
