"""docs/operator-guide.md "Command-line errors": every documented case, run as written.

Each must print exactly its documented line (one `error: ... (hint: ...)` line) on
standard error, nothing on standard output, and exit 2. Before, `keys init-kek` on an
existing KEK printed a `KekError` traceback, config errors printed a multi-line list and
exit codes were 1.
"""

from __future__ import annotations

import re

import pytest

from tests.docs.ops_harness import REPO, Checkout

OPERATOR_GUIDE = REPO / "docs" / "operator-guide.md"
_ROW = re.compile(r"^\| `(extproc [^`]+)` \| `(error: .*)` \|$", re.MULTILINE)


def documented_cases() -> list[tuple[str, str]]:
    text = OPERATOR_GUIDE.read_text(encoding="utf-8")
    section = text[text.index("### Command-line errors"):text.index("## The Envoy side")]
    return _ROW.findall(section)


def test_the_table_is_read() -> None:
    cases = documented_cases()
    assert len(cases) == 11
    assert cases[0][0] == "extproc keys init-kek --config deploy/demo/asc-keyring.yaml"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Checkout:
    """The keyring demo with its KEK created; its Redis (a free port) is not running."""
    checkout = Checkout(tmp_path_factory.mktemp("cli-errors") / "checkout")
    checkout.run(".venv/bin/extproc keys init-kek --config deploy/demo/asc-keyring.yaml")
    return checkout


@pytest.mark.parametrize(("command", "line"), documented_cases(),
                         ids=[c for c, _ in documented_cases()])
def test_documented_error(checkout: Checkout, command: str, line: str) -> None:
    done = checkout.run(".venv/bin/" + command, check=False)
    expected = line.replace("$PWD", str(checkout.root))
    assert (done.returncode, done.stdout, done.stderr) == (2, "", expected + "\n")


def test_an_unexpected_failure_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug keeps its traceback: only operator errors become one line."""
    from extproc import cli

    def broken(_args: object) -> int:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(cli, "_cmd_config_schema", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["config", "schema"])


def test_check_config_pepper_hint_names_a_pepper(checkout: Checkout) -> None:
    """The pepper's hint used to suggest `{env: OPENAI_API_KEY}`, a provider key."""
    demo = (checkout.root / "deploy/demo/asc.yaml").read_text(encoding="utf-8")
    broken = demo.replace("pepper: {file: pepper.txt}",
                          "pepper: {env: ASC_PEPPER, file: pepper.txt}")
    assert broken != demo
    (checkout.root / "deploy/demo/pepper-both.yaml").write_text(broken, encoding="utf-8")
    done = checkout.run(".venv/bin/extproc check-config deploy/demo/pepper-both.yaml",
                        check=False)
    assert (done.returncode, done.stdout, done.stderr) == (
        1, "", "deploy/demo/pepper-both.yaml: 1 problem(s)\n"
               "  auth.pepper (line 6): needs exactly one of `env` or `file`\n"
               "    hint: e.g. {file: /etc/asc/pepper.txt} or {env: ASC_PEPPER}\n")
