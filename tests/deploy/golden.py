"""The Envoy bootstraps under deploy/ are `extproc envoy render` output: each equals,
byte for byte, what the command in its `# Regenerate:` header renders (run from the
repository root), and a real Envoy accepts it. Same check as envoy/*.yaml
(tests/integration/test_render_shapes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.cli import main as extproc_cli
from tests.integration.test_render_shapes import REPO, envoy_validate, regenerate_command

__all__ = ["assert_rendered"]


def assert_rendered(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    shape: str = "sidecar") -> None:
    argv = regenerate_command(path)
    assert argv[argv.index("--shape") + 1] == shape
    monkeypatch.chdir(REPO)  # the header names the config relative to the repository
    rendered = tmp_path / path.name
    assert extproc_cli([*argv, "--output", str(rendered)]) == 0
    assert path.read_text(encoding="utf-8") == rendered.read_text(encoding="utf-8")
    envoy_validate(path, tmp_path)
