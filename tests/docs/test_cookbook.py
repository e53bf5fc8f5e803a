"""Issue 16 item 6: docs/operator-cookbook.md, run as written against a real stack.

Every block the cookbook marks `tested by tests/docs/test_cookbook.py` is extracted from
the markdown and run here, in the order an operator would, on one stack (Envoy, extproc,
redis-server, the emulator) with a file-KEK keyring: shell blocks run in bash in the
config's directory, YAML blocks are merged into `asc.yaml` (lists appended) after filling
in the `<hash printed above>` the page tells the reader to paste. The only other changes
are the page's conventions: its Envoy address and `extproc.log` become this stack's.
The same goes for the `Operating budgets` commands of docs/budgets.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.devstack import Stack
from tests.conftest import (
    PROVIDER_KEY_US,
    Gateway,
    gateway_config,
    start_gateway,
    write_config,
)
from tests.docs.markdown import REPO, Block, blocks

COOKBOOK = REPO / "docs/operator-cookbook.md"
THIS = "tests/docs/test_cookbook.py"
DOC_ADDRESS = "http://127.0.0.1:10000"
CREDENTIAL = "openai-eu-1"
KEY_V1 = "sk-cookbook-provider-v1-not-a-real-key"
KEY_V2 = "sk-cookbook-provider-v2-not-a-real-key"
BOUND_S = 20.0


def marked_blocks(path: Path) -> list[Block]:
    return [block for block in blocks(path)
            if block.marker is not None and block.marker.kind == "tested"
            and block.marker.target == THIS]


def section(heading: str, lang: str, path: Path = COOKBOOK) -> list[Block]:
    found = [block for block in marked_blocks(path) if block.heading == heading
             and block.lang == lang]
    assert found, f"no tested {lang} block under '{heading}' in {path.name}"
    return found


def cookbook_document(redis_port: int) -> Callable[[int], dict[str, Any]]:
    """The tests' gateway with Redis, a file KEK, provider emu-eu on keyring credential
    openai-eu-1, and a monthly budget for acme."""

    def document(emulator_port: int) -> dict[str, Any]:
        doc = gateway_config(emulator_port)
        doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout_ms": 500}
        doc["secrets"] = {"kek": {"backend": "file", "path": "kek.key"}}
        doc["credentials"] = {CREDENTIAL: {"keyring": True},
                              "emu-us-1": {"env": "TEST_PROVIDER_KEY_US"}}
        doc["providers"]["emu-eu"]["credentials"] = [CREDENTIAL]
        doc["tenants"]["acme"]["budgets"] = [
            {"scope": "tenant", "window": "month", "limit_usd": 500}]
        # globex: metered, as the cookbook suggests, not limited; initech: no budget.
        doc["tenants"]["globex"]["budgets"] = [
            {"scope": "tenant", "window": "month", "limit_usd": 1000000}]
        return doc

    return document


@dataclass
class Operator:
    """Runs the page's commands in the config directory, and keeps the requests made."""

    gateway: Gateway
    directory: Path
    log: Path
    calls: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def sh(self, block: Block | str, **env: str) -> str:
        script = block.text if isinstance(block, Block) else block
        script = script.replace(DOC_ADDRESS, self.gateway.base_url).replace(
            "extproc.log", str(self.log))
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=self.directory,
                              capture_output=True, text=True, timeout=120, check=False,
                              env=dict(os.environ, PATH=path, **env))
        assert (done.returncode, done.stderr) == (0, ""), (script, done.stdout, done.stderr)
        return done.stdout

    def merge(self, block: Block, **fill: str) -> None:
        text = block.text
        for placeholder, value in fill.items():
            assert placeholder in text
            text = text.replace(placeholder, value)
        config = self.directory / "asc.yaml"
        document = yaml.safe_load(config.read_text(encoding="utf-8"))
        _merge(document, yaml.safe_load(text))
        config.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")

    def call(self, key: str, tenant: str, key_id: str) -> httpx.Response:
        response = self.gateway.chat(key=key)
        credential = response.headers.get("x-asc-credential", "-")
        self.calls[(tenant, key_id, credential)] += 1
        return response

    def until_served(self, key: str) -> None:
        """Polls (bounded) until a reload has taken the new key in."""
        deadline = time.monotonic() + BOUND_S
        while self.gateway.chat(key=key).status_code == 401:
            assert time.monotonic() < deadline, "the config was not reloaded"
            time.sleep(0.1)

    def finished(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(encoding="utf-8").splitlines()
        return [entry for entry in map(json.loads, lines)
                if entry.get("msg") == "request finished"
                and entry.get("tenant") not in (None, "-")]


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif isinstance(value, list) and isinstance(into.get(key), list):
            into[key].extend(value)
        else:
            into[key] = value


def generated(output: str) -> tuple[str, str]:
    match = re.fullmatch(r"key:  (sk-asc-\S+)\nhash: (hmac-sha256:v1:[0-9a-f]{64})\n", output)
    assert match, output
    return match[1], match[2]


def wait(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    workdir = tmp_path_factory.mktemp("cookbook")
    config_dir = workdir / "config"
    with Stack(workdir) as stack:
        _, redis_port = stack.start_redis()
        document = cookbook_document(redis_port)
        write_config(config_dir, document(1))
        (config_dir / "v1.txt").write_text(KEY_V1 + "\n", encoding="utf-8")
        for command in (["init-kek"], ["add", CREDENTIAL, "--from-file", "v1.txt"]):
            subprocess.run([sys.executable, "-m", "extproc", "keys", *command, "--config",
                            "asc.yaml"], cwd=config_dir, check=True, capture_output=True,
                           timeout=60)
        gateway = start_gateway(stack, config_dir, document=document)
        accepted = gateway.emulator.client.put(
            "/_emulator/keys", json={"keys": [KEY_V1, PROVIDER_KEY_US]})
        assert accepted.status_code == 204
        yield Operator(gateway, config_dir, stack.workdir / "extproc.log")


def test_cookbook_blocks_are_all_run_here() -> None:
    """Every tested block of the page is one this module runs (no orphan, no typo)."""
    headings = Counter((block.heading, block.lang) for block in marked_blocks(COOKBOOK))
    assert headings == {
        ("Add a tenant and its key", "sh"): 2, ("Add a tenant and its key", "yaml"): 1,
        ("See spend for all tenants", "sh"): 2,
        ("Give a team its own budget", "yaml"): 1, ("Give a team its own budget", "sh"): 1,
        ("Rotate a provider key", "sh"): 3, ("Who used credential X yesterday", "sh"): 2}
    assert [block.heading for block in marked_blocks(REPO / "README.md")] == ["Commands"]
    assert [block.heading for block in marked_blocks(REPO / "docs/budgets.md")] == [
        "Operating budgets"]


def test_the_cookbook_end_to_end(operator: Operator) -> None:
    from tests.conftest import ACME_KEY, GLOBEX_KEY

    # -- add a tenant and its key ---------------------------------------------------------
    hash_block, check_and_curl = section("Add a tenant and its key", "sh")
    [tenant_yaml] = section("Add a tenant and its key", "yaml")
    new_key, new_hash = generated(operator.sh(hash_block))
    operator.merge(tenant_yaml, **{"<hash printed above>": new_hash})
    operator.until_served(new_key)
    out = operator.sh(check_and_curl, NEW_KEY=new_key)
    first, _, body = out.partition("\n")
    assert first == "asc.yaml: ok (3 tenants, 2 providers, 2 models)"
    assert json.loads(body)["choices"][0]["message"]["content"] == "Hello from the emulator."
    operator.calls[("initech", "initech-main", "emu-us-1@1")] += 2  # until_served + curl
    assert operator.call(new_key, "initech", "initech-main").status_code == 200

    # -- see spend for all tenants --------------------------------------------------------
    for _ in range(2):
        assert operator.call(ACME_KEY, "acme", "acme-main").status_code == 200
    assert operator.call(GLOBEX_KEY, "globex", "globex-main").status_code == 200
    requests = sum(operator.calls.values())
    wait(lambda: len(operator.finished()) == requests, "request finished lines")
    show_all, from_log = section("See spend for all tenants", "sh")
    charged = Counter[str]()
    for entry in operator.finished():
        charged[entry["tenant"]] += entry["charged_micro_usd"] or 0
    assert (charged["acme"] > 0, charged["globex"] > 0, charged["initech"]) == (
        True, True, 0)

    def usd(micro: int) -> str:
        return f"{micro // 1_000_000}.{micro % 1_000_000:06d}"

    def rows() -> list[list[str]]:
        return [line.split() for line in operator.sh(show_all).splitlines()[2:]]

    wait(lambda: all(row[8] == "0.000000" for row in rows()), "holds settled")
    assert [(row[:4], row[6]) for row in rows()] == [
        (["acme", "1", "tenant:month", "tenant"], usd(charged["acme"])),
        (["globex", "1", "tenant:month", "tenant"], usd(charged["globex"]))]
    assert operator.sh(from_log).splitlines() == [
        f"acme {usd(charged['acme'])} USD", f"globex {usd(charged['globex'])} USD"]

    # -- give a team its own budget -------------------------------------------------------
    team_key, team_hash = generated(operator.sh(hash_block))
    [team_yaml] = section("Give a team its own budget", "yaml")
    [team_sh] = section("Give a team its own budget", "sh")
    operator.merge(team_yaml, **{"<hash printed above>": team_hash})
    operator.until_served(team_key)
    operator.calls[("acme", "acme-data-team", f"{CREDENTIAL}@1")] += 1
    out = operator.sh(team_sh).splitlines()
    assert out[0] == "asc.yaml: ok (3 tenants, 2 providers, 2 models)"
    team_row = [line.split() for line in out[3:] if "acme-data-team" in line]
    assert [cells[:6] for cells in team_row] == [
        ["acme", "2", "key:acme-data-team:month", "key", "50.000000", "USD"]]
    correction = ("extproc budget set acme --config asc.yaml --limit "
                  "key:acme-data-team:month --spent-usd 12.5 --yes")
    assert correction in COOKBOOK.read_text(encoding="utf-8")
    assert operator.sh(correction) == "set: 2 key:acme-data-team:month: spent 12.500000 USD\n"
    operator.sh(correction.replace("12.5", "50"))
    refused = operator.gateway.chat(key=team_key)
    operator.calls[("acme", "acme-data-team", "-")] += 1
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    message = refused.json()["error"]["message"]
    assert message == ("Request refused: it would exceed the key 'acme-data-team' monthly "
                       "budget (limit USD 50.00).")
    assert f"`{message}`" in " ".join(COOKBOOK.read_text(encoding="utf-8").split())
    assert operator.call(ACME_KEY, "acme", "acme-main").status_code == 200  # others go on

    # -- rotate a provider key ------------------------------------------------------------
    stage, promote, revoke = section("Rotate a provider key", "sh")
    (operator.directory / "new-key.txt").write_text(KEY_V2 + "\n", encoding="utf-8")
    accepted = operator.gateway.emulator.client.put(
        "/_emulator/keys", json={"keys": [KEY_V1, KEY_V2, PROVIDER_KEY_US]})
    assert accepted.status_code == 204  # the new key is valid at the provider first
    out = operator.sh(stage).splitlines()
    assert out[0].startswith(f"global/{CREDENTIAL}@2: staged, fingerprint sha256:"), out
    assert out[1:] == [f"global/{CREDENTIAL}: canary done (v1=active, v2=canary(10%))"], out
    assert operator.sh(promote) == (
        f"global/{CREDENTIAL}: promote done (v1=retiring, v2=active)\n")
    streak = 0

    def on_v2() -> bool:
        nonlocal streak
        response = operator.call(ACME_KEY, "acme", "acme-main")
        assert response.status_code == 200
        streak = streak + 1 if response.headers["x-asc-credential"] == f"{CREDENTIAL}@2" else 0
        return streak >= 10

    wait(on_v2, "the gateway follows the promote")
    listing = operator.sh(revoke).splitlines()
    assert listing[0] == f"global/{CREDENTIAL}: revoke done (v1=revoked, v2=active)"
    states = {(cells[0], cells[1]): cells[2] for cells in map(str.split, listing[2:])
              if cells[0] == f"global/{CREDENTIAL}"}
    assert states == {(f"global/{CREDENTIAL}", "1"): "revoked",
                      (f"global/{CREDENTIAL}", "2"): "active"}, listing
    accepted = operator.gateway.emulator.client.put(
        "/_emulator/keys", json={"keys": [KEY_V2, PROVIDER_KEY_US]})
    assert accepted.status_code == 204  # ... then the old key is revoked at the provider
    assert operator.call(ACME_KEY, "acme", "acme-main").headers["x-asc-credential"] == (
        f"{CREDENTIAL}@2")

    # -- who used credential X yesterday --------------------------------------------------
    day_block, query = section("Who used credential X yesterday", "sh")
    yesterday = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    assert operator.sh(day_block.text + 'echo "$DAY"\n') == yesterday + "\n"
    requests = sum(operator.calls.values())
    wait(lambda: len(operator.finished()) == requests, "request finished lines")
    used: Counter[tuple[str, str]] = Counter()
    for (tenant, key_id, credential), count in operator.calls.items():
        if credential.startswith(f"{CREDENTIAL}@"):
            used[(tenant, key_id)] += count
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    rows = [line.split() for line in operator.sh(query, DAY=today).splitlines()]
    assert sorted(rows) == sorted([str(n), tenant, key_id] for (tenant, key_id), n in
                                  used.items()), rows
    assert operator.sh(query, DAY=yesterday) == ""

    # -- docs/budgets.md, operating budgets -------------------------------------------
    [operating] = section("Operating budgets", "sh", REPO / "docs/budgets.md")
    out = operator.sh(operating).splitlines()
    assert [line.split()[:3] for line in out if line.startswith("acme ")] == [
        ["acme", "1", "tenant:month"], ["acme", "2", "key:acme-data-team:month"]] * 2
    assert [line.split()[:3] for line in out if line.startswith("globex ")] == [
        ["globex", "1", "tenant:month"]]
    assert out[-3:] == ["set: 1 tenant:month: spent 123.450000 USD",
                        "reset: 1 tenant:month: spent 0.000000 USD",
                        "reset: 2 key:acme-data-team:month: spent 0.000000 USD"]


def test_readme_command_synopsis_names_real_commands(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """README's `Commands` block is a synopsis: every `extproc` command and subcommand it
    names (`a|b` alternatives included) exists, and so does the emulator module."""
    from extproc.cli import build_parser

    [synopsis] = section("Commands", "sh", REPO / "README.md")
    commands: list[list[str]] = []
    for line in synopsis.text.splitlines():
        words = line.split("#")[0].split()
        if words[:1] == ["extproc"]:
            head = [word for word in words[1:3] if not word.startswith(("-", "<", "["))
                    and "." not in word and word.upper() != word]
            options = [part.split("|") for part in head]
            commands.extend([first, *rest] for first in options[0]
                            for rest in ([[second] for second in options[1]]
                                         if len(options) > 1 else [[]]))
        else:
            assert words[:3] == ["python", "-m", "extproc.emulator"], line
    assert len(commands) == 20, commands
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*command, "--help"])
        assert exit_.value.code == 0, command
    capsys.readouterr()
