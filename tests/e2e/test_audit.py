"""Audit records through real Envoy, extproc and the emulator: the Envoy access-log join,
the published record schema, and `extproc audit verify|query` on a live log, across a
restart and a clean shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from extproc.credentials.kek import init_kek_file
from extproc.devstack import Stack, free_port
from tests.conftest import (
    ACME_KEY,
    GLOBEX_KEY,
    Emulator,
    Gateway,
    chat_body,
    gateway_config,
    provider_env,
    start_gateway,
    write_config,
)
from tests.e2e.audit_check import access_log_line, assert_one_record, audit_dir, records

pytestmark = pytest.mark.e2e

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "schema"
                     / "audit-record.schema.json").read_text(encoding="utf-8"))


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc", "audit", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_envoy_access_log_and_audit_record_share_request_id_and_tenant(
        gateway: Gateway, emulator_clean: Emulator) -> None:
    response = gateway.chat(chat_body(), key=GLOBEX_KEY)
    assert response.status_code == 200
    request_id = response.headers["x-asc-request-id"]

    record = assert_one_record(gateway, request_id, tenant="globex",
                               principal__subject="globex-main", route__provider="emu-us",
                               credential="emu-us-1@1", status=200)
    access = access_log_line(gateway, request_id)
    assert (access["request_id"], access["tenant"], access["provider"], access["region"],
            access["credential"], access["status"]) == (
        record["request_id"], record["tenant"], record["route"]["provider"],
        record["route"]["region"], record["credential"], record["status"])
    # The peer Envoy accepted the connection from (ip:port) is the one the record names.
    assert record["source_address"] == access["client_address"]
    assert record["source_address"].startswith("127.0.0.1:")


def test_denied_request_is_joined_too(gateway: Gateway, emulator_clean: Emulator) -> None:
    response = gateway.chat(chat_body("gpt-4o"))
    assert response.status_code == 403
    request_id = response.headers["x-asc-request-id"]
    assert_one_record(gateway, request_id, tenant="acme", status=403,
                      error="model_not_allowed", route=None, attempts=[], credential=None)
    access = access_log_line(gateway, request_id)
    assert (access["request_id"], access["tenant"], access["status"]) == (
        request_id, "acme", 403)


def test_every_record_matches_the_published_schema(
        gateway: Gateway, emulator_clean: Emulator) -> None:
    gateway.chat(chat_body())
    gateway.chat(chat_body(), key="sk-not-a-key")
    found = records(audit_dir(gateway))
    assert len(found) >= 2
    for record in found:
        jsonschema.validate(record, SCHEMA)


def test_live_log_verifies_restart_and_shutdown_close_each_writer(stack: Stack,
                                                                  tmp_path: Path) -> None:
    def document(emulator_port: int) -> dict[str, Any]:
        doc = gateway_config(emulator_port)
        doc["audit"] = {"checkpoint_every": 2}
        return doc

    gateway = start_gateway(stack, tmp_path / "config", document=document)
    ids = [gateway.chat(chat_body()).headers["x-asc-request-id"] for _ in range(3)]
    for request_id in ids:
        assert_one_record(gateway, request_id, status=200)
    directory = audit_dir(gateway)
    # A new HMAC key while it runs: the writer takes it at its next checkpoint (after
    # record 4), records carry its id from record 5 on.
    rotated = audit_cli("rotate-key", "--config", str(gateway.config_path), "--dir",
                        str(directory))
    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.split()[4].rstrip(":")
    later = [gateway.chat(chat_body()).headers["x-asc-request-id"] for _ in range(2)]
    assert assert_one_record(gateway, later[0], status=200)["kid"] != new_kid
    assert assert_one_record(gateway, later[1], status=200)["kid"] == new_kid

    live = audit_cli("verify", str(directory), "--allow-open")
    assert live.returncode == 0, live.stdout + live.stderr
    assert "ok: 5 records" in live.stdout
    closed_check = audit_cli("verify", str(directory))
    assert closed_check.returncode == 1  # still running: no final checkpoint yet
    assert "no final checkpoint after seq 5" in closed_check.stdout

    # SIGTERM: the writer drains and seals; a new process is a new writer segment.
    assert gateway.extproc.stop(sig=signal.SIGTERM) == 0
    stack.processes.remove(gateway.extproc)
    env = dict(stack.env, **provider_env())
    extproc, _, _ = stack.start_extproc(gateway.config_path, port=gateway.extproc_port,
                                        env=env)
    second = gateway.chat(chat_body()).headers["x-asc-request-id"]
    assert_one_record(gateway, second, status=200)
    assert extproc.stop(sig=signal.SIGTERM) == 0
    stack.processes.remove(extproc)

    result = audit_cli("verify", str(directory), "--config", str(gateway.config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(
        "ok: 6 records, 6 checkpoints, 2 writers; checked checkpoint signatures, linkage "
        "and MACs")

    # One record edited: verify names its file and line, exit 1.
    files = sorted(directory.glob("audit-*.jsonl"))
    first = files[0]
    lines = first.read_text(encoding="utf-8").splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if ids[1] in line)
    lines[index] = lines[index].replace('"tenant":"acme"', '"tenant":"globex"')
    first.write_text("".join(lines), encoding="utf-8")
    tampered = audit_cli("verify", str(directory), "--config", str(gateway.config_path))
    assert tampered.returncode == 1
    assert tampered.stdout.startswith(f"FAIL {first}:{index + 1} ")
    assert "seq 2: MAC mismatch" in tampered.stdout

    found = audit_cli("query", str(directory), "--request-id", second)
    assert [json.loads(line)["request_id"] for line in found.stdout.splitlines()] == [second]


def test_query_by_tenant_and_time_on_a_live_gateway(gateway: Gateway,
                                                    emulator_clean: Emulator) -> None:
    response = gateway.chat(chat_body(), key=ACME_KEY)
    request_id = response.headers["x-asc-request-id"]
    record = assert_one_record(gateway, request_id, tenant="acme")
    started = datetime.fromtimestamp(record["time_ns"] / 1e9, UTC)
    at = started.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"
    result = audit_cli("query", str(audit_dir(gateway)), "--tenant", "acme", "--at", at)
    assert result.returncode == 0, result.stderr
    assert request_id in [json.loads(line)["request_id"] for line in result.stdout.splitlines()]
    table = audit_cli("query", str(audit_dir(gateway)), "--request-id", request_id, "--table")
    header, row = table.stdout.splitlines()
    assert header.split() == ["time", "request_id", "tenant", "model_asked", "provider",
                              "region", "credential", "status"]
    assert row.split()[1:] == [request_id, "acme", "gpt-4o-mini", "emu-eu", "eu-west-1",
                               "emu-eu-1@1", "200"]


@pytest.mark.both_paths
def test_captured_text_is_sealed_for_the_opted_in_tenant_only(stack: Stack,
                                                              tmp_path: Path) -> None:
    kek_path = init_kek_file(tmp_path / "kek.key")

    def document(emulator_port: int) -> dict[str, Any]:
        doc = gateway_config(emulator_port)
        doc["secrets"] = {"kek": {"backend": "file", "path": str(kek_path)}}
        doc["tenants"]["acme"]["audit"] = {"capture": True}
        return doc

    gateway = start_gateway(stack, tmp_path / "config", document=document)
    marker = "capture-marker-" + "7" * 8
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": marker}]}
    captured = gateway.chat(body).headers["x-asc-request-id"]
    plain = gateway.chat(body, key=GLOBEX_KEY).headers["x-asc-request-id"]

    sealed = assert_one_record(gateway, captured, tenant="acme", capture__scope="tenant:acme")
    assert "capture" not in assert_one_record(gateway, plain, tenant="globex")
    files = list(audit_dir(gateway).glob("audit-*.jsonl"))
    assert marker not in "".join(f.read_text(encoding="utf-8") for f in files)
    assert marker not in gateway.extproc.log_text()
    jsonschema.validate(sealed, SCHEMA)

    opened = audit_cli("unseal", str(audit_dir(gateway)), "--config",
                       str(gateway.config_path), "--request-id", captured)
    assert opened.returncode == 0, opened.stderr
    text = json.loads(opened.stdout)
    assert json.loads(text["request"]) == body
    assert json.loads(text["response"])["choices"][0]["message"]["content"] == (
        "Hello from the emulator.")
    refused = audit_cli("unseal", str(audit_dir(gateway)), "--config",
                        str(gateway.config_path), "--request-id", plain)
    assert refused.returncode == 2
    assert f"record {plain} has no sealed capture" in refused.stderr


def test_extproc_refuses_to_start_without_a_writable_audit_log(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("", encoding="utf-8")
    document = gateway_config(free_port())
    document["audit"] = {"dir": str(blocker / "audit")}
    config = write_config(tmp_path / "config", document)
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--config", str(config), "--listen",
         f"127.0.0.1:{free_port()}", "--metrics-listen", ""],
        capture_output=True, text=True, timeout=60, check=False,
        env=dict(provider_env(), PATH="/usr/bin:/bin"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = [json.loads(raw) for raw in result.stderr.splitlines()
              if "cannot start" in raw]
    assert line["msg"] == "cannot start: audit log unavailable"
    assert "Not a directory" in line["error"]
