"""docs/credentials.md "Try the keyring locally", run as written against `make run`.

Real processes throughout: make, the dev stack (redis-server, emulator, extproc, Envoy),
the `extproc keys` CLI and curl. The emulator must accept the keys the operator seals,
and a restart must keep them (persistent local Redis).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.docs.ops_harness import REPO, Checkout, commands, running, sh_blocks

CREDENTIALS_MD = REPO / "docs" / "credentials.md"
HEADING = "## Try the keyring locally"
FINGERPRINT = r"sha256:[0-9a-f]{12}"


def used_credential(checkout: Checkout, curl: str, expected: str, *,
                    timeout: float = 10.0) -> str:
    """Run the documented curl until it names `expected` (a key change reaches the
    gateway within about a second); the last header seen."""
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        done = checkout.run(curl, check=False)
        seen = done.stdout.strip()
        if seen == f"x-asc-credential: {expected}":
            return seen
        time.sleep(0.1)
    return seen


def test_keyring_path_as_documented(tmp_path: Path) -> None:
    blocks = [commands(block) for block in sh_blocks(CREDENTIALS_MD, HEADING)]
    setup, add_first, [curl], rotation, rollback, restage = blocks
    assert setup == ["make install",
                     ".venv/bin/extproc keys init-kek --config deploy/demo/asc-keyring.yaml",
                     "make run CONFIG=deploy/demo/asc-keyring.yaml"]
    checkout = Checkout(tmp_path / "checkout")
    for command in setup[:2]:
        checkout.run(command, timeout=300)
    assert (checkout.root / "var" / "demo-kek.key").stat().st_mode & 0o777 == 0o600

    with running(checkout, setup[2]) as stack:
        assert "provider-keys" in stack.output[0]
        # Nothing sealed yet: acme's provider key is unusable, nothing reaches the emulator.
        refused = checkout.run(curl.replace("-o /dev/null -D -", "-D -").replace(
            " | grep -i '^x-asc-credential'", ""))
        assert refused.stdout.startswith("HTTP/1.1 503"), refused.stdout
        assert '"No usable credential for the selected provider."' in refused.stdout

        listing = rollback[2]
        # A keyring credential with no versions yet is listed, not hidden.
        assert checkout.run(listing).stdout.splitlines()[2].split() == [
            "global/emu-eu-1", "-", "no", "versions", "(keys", "add)"]

        [add] = add_first
        added = checkout.run(add)
        assert re.fullmatch(rf"global/emu-eu-1@1: active, fingerprint {FINGERPRINT}\n",
                            added.stdout), added
        assert used_credential(checkout, curl, "emu-eu-1@1") == "x-asc-credential: emu-eu-1@1"

        stage, canary, promote = rotation
        assert re.fullmatch(rf"global/emu-eu-1@2: staged, fingerprint {FINGERPRINT}\n",
                            checkout.run(stage).stdout)
        assert used_credential(checkout, curl, "emu-eu-1@1") == "x-asc-credential: emu-eu-1@1"
        checkout.run(canary)
        assert used_credential(checkout, curl, "emu-eu-1@2") == "x-asc-credential: emu-eu-1@2"
        assert checkout.run(promote).stdout == (
            "global/emu-eu-1: promote done (v1=retiring, v2=active)\n")
        assert used_credential(checkout, curl, "emu-eu-1@2") == "x-asc-credential: emu-eu-1@2"

        back, revoke, _ = rollback
        assert checkout.run(back).stdout == (
            "global/emu-eu-1: rollback done (v1=active, v2=staged(failed canary))\n")
        assert used_credential(checkout, curl, "emu-eu-1@1") == "x-asc-credential: emu-eu-1@1"
        checkout.run(revoke)
        rows = [line.split() for line in checkout.run(listing).stdout.splitlines()]
        assert rows[0] == ["credential", "version", "state", "fingerprint", "kek",
                           "kek-version"]
        assert rows[1] == ["emu-us-1", "-", "static", "(env", "ASC_DEMO_PROVIDER_KEY_US)"]
        assert [(r[0], r[1], r[2], r[5]) for r in rows[2:]] == [
            ("global/emu-eu-1", "1", "active", "-"), ("global/emu-eu-1", "2", "revoked", "-")]

        [again] = restage
        refused_add = checkout.run(again, check=False)
        assert (refused_add.returncode, refused_add.stdout, refused_add.stderr) == (
            2, "", "error: this key is global/emu-eu-1@2, which is revoked; refusing to seal "
                   "it again (hint: a revoked key stays revoked: get a new key from the "
                   "provider)\n")

    # Ctrl-C, then the same `make run`: the sealed keys and their states are still there.
    with running(checkout, setup[2]):
        assert used_credential(checkout, curl, "emu-eu-1@1") == "x-asc-credential: emu-eu-1@1"
