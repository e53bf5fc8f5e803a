"""Virtual-key hashing and lookup (`extproc.auth`), `Secret` and `resolve_secret`."""

from __future__ import annotations

import hashlib
import hmac
import io
import pickle
import sys
from pathlib import Path

import pytest

from extproc.auth import Principal, TenantDirectory, hash_key, presented_key
from extproc.cli import main
from extproc.config import CredentialRef, parse_config
from extproc.secrets import Secret, SecretUnavailable, resolve_secret

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO_ROOT / "deploy" / "demo"
PEPPER = "pepper-for-unit-tests"
ACME_KEY = "sk-asc-acme-0001"
GLOBEX_KEY = "sk-asc-globex-0001"


def make_config_text(pepper_ref: str, hashes: dict[str, str]) -> str:
    tenants = "".join(
        f"  {tenant}:\n    keys: [{{id: {tenant}-1, hash: \"{digest}\"}}]\n"
        "    models: [gpt-4o-mini]\n"
        for tenant, digest in hashes.items()
    )
    return f"""\
version: 1
auth: {{pepper: {pepper_ref}}}
providers:
  local:
    kind: openai_compatible
    base_url: "http://127.0.0.1:18080"
    region: lab
    zone: lab
    cluster: local
models:
  gpt-4o-mini:
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.60}}
    deployments: [{{provider: local}}]
tenants:
{tenants}"""


def make_directory() -> TenantDirectory:
    pepper = Secret(PEPPER)
    text = make_config_text("{env: ASC_PEPPER}", {
        "acme": hash_key(pepper, ACME_KEY),
        "globex": hash_key(pepper, GLOBEX_KEY),
    })
    return TenantDirectory(parse_config(text), pepper)


# -- hash_key ---------------------------------------------------------------------------


def test_hash_key_format() -> None:
    digest = hmac.new(PEPPER.encode(), ACME_KEY.encode(), hashlib.sha256).hexdigest()
    assert hash_key(Secret(PEPPER), ACME_KEY) == "hmac-sha256:v1:" + digest
    assert len(hash_key(Secret(PEPPER), "")) == len("hmac-sha256:v1:") + 64


def test_hash_key_is_deterministic_and_depends_on_pepper_and_key() -> None:
    first = hash_key(Secret(PEPPER), ACME_KEY)
    assert hash_key(Secret(PEPPER), ACME_KEY) == first
    assert hash_key(Secret(PEPPER + "x"), ACME_KEY) != first
    assert hash_key(Secret(PEPPER), ACME_KEY + "x") != first


def test_hash_key_matches_demo_config() -> None:
    """The demo's documented keys hash, with the demo pepper, to the hashes in asc.yaml."""
    pepper = Secret((DEMO_DIR / "pepper.txt").read_text(encoding="utf-8").rstrip("\r\n"))
    assert hash_key(pepper, "sk-asc-demo-acme-key") == (
        "hmac-sha256:v1:de4b293b433ab5aca3b616f4a6f3558caa767b3bdc532363bf02ad67fe5938ce")
    assert hash_key(pepper, "sk-asc-demo-globex-key") == (
        "hmac-sha256:v1:5a75a37a6468947ccc006c8af4d1b5f9fc937b79dd39bf9f7c6e2069f15deb56")


# -- presented_key ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"authorization": "Bearer sk-1"}, "sk-1"),
        ({"authorization": "bearer sk-1"}, "sk-1"),
        ({"authorization": "BEARER  sk-1 "}, "sk-1"),
        ({"authorization": "  Bearer sk-1"}, "sk-1"),
        ({"x-api-key": "sk-2"}, "sk-2"),
        ({"x-api-key": "  sk-2\t"}, "sk-2"),
        ({"authorization": "Bearer sk-1", "x-api-key": "sk-2"}, "sk-1"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": "sk-2"}, "sk-2"),
        ({"authorization": "Bearer", "x-api-key": "sk-2"}, "sk-2"),
        ({"authorization": "Bearer "}, None),
        ({"authorization": ""}, None),
        ({"x-api-key": ""}, None),
        ({"x-api-key": "   "}, None),
        ({"api-key": "sk-3"}, None),
        ({}, None),
    ],
)
def test_presented_key(headers: dict[str, str], key: str | None) -> None:
    assert presented_key(headers) == key


# -- TenantDirectory --------------------------------------------------------------------


def test_authenticate_good_keys() -> None:
    directory = make_directory()
    acme = directory.authenticate(ACME_KEY)
    globex = directory.authenticate(GLOBEX_KEY)
    assert isinstance(acme, Principal)
    assert (acme.tenant.id, acme.key_id) == ("acme", "acme-1")
    assert isinstance(globex, Principal)
    assert (globex.tenant.id, globex.key_id) == ("globex", "globex-1")


@pytest.mark.parametrize("key", ["", "sk-asc-acme-0002", ACME_KEY + " ", ACME_KEY.upper(),
                                 hash_key(Secret(PEPPER), ACME_KEY)])
def test_authenticate_bad_keys(key: str) -> None:
    assert make_directory().authenticate(key) is None


def test_authenticate_needs_the_same_pepper() -> None:
    text = make_config_text("{env: ASC_PEPPER}", {"acme": hash_key(Secret(PEPPER), ACME_KEY)})
    directory = TenantDirectory(parse_config(text), Secret("another-pepper"))
    assert directory.authenticate(ACME_KEY) is None


def test_directory_repr_shows_no_hashes() -> None:
    assert repr(make_directory()) == "TenantDirectory(2 keys)"


# -- Secret -----------------------------------------------------------------------------


def test_secret_never_shows_its_value() -> None:
    secret = Secret("sk-canary-secret-XYZ")
    assert repr(secret) == "Secret(***)"
    assert str(secret) == "Secret(***)"
    assert f"{secret}" == "Secret(***)"
    assert f"{secret!r}" == "Secret(***)"
    assert repr([secret]) == "[Secret(***)]"
    assert secret.reveal() == "sk-canary-secret-XYZ"


def test_secret_fingerprint() -> None:
    value = "sk-canary-secret-XYZ"
    expected = "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:12]
    assert Secret(value).fingerprint() == expected


def test_secret_cannot_be_pickled() -> None:
    with pytest.raises(TypeError, match=r"^Secret cannot be pickled$"):
        pickle.dumps(Secret("sk-canary-secret-XYZ"))


def test_secret_is_neither_hashable_nor_equal_by_value() -> None:
    first, second = Secret("same"), Secret("same")
    assert first != second
    assert first == first  # identity is the only equality
    with pytest.raises(TypeError):
        hash(first)


# -- resolve_secret ---------------------------------------------------------------------


def test_resolve_secret_from_env() -> None:
    secret = resolve_secret(CredentialRef("openai", env="OPENAI_KEY"), {"OPENAI_KEY": "sk-env"})
    assert secret.reveal() == "sk-env"


def test_resolve_secret_cuts_an_env_values_trailing_newline_like_a_files() -> None:
    # A Kubernetes Secret made with --from-file keeps the file's newline in the variable.
    ref = CredentialRef("pepper", env="ASC_PEPPER")
    assert resolve_secret(ref, {"ASC_PEPPER": "pepper-value\n"}).reveal() == "pepper-value"
    assert resolve_secret(ref, {"ASC_PEPPER": "pepper-value\r\n"}).reveal() == "pepper-value"
    with pytest.raises(SecretUnavailable, match="ASC_PEPPER is not set"):
        resolve_secret(ref, {"ASC_PEPPER": "\n"})


def test_resolve_secret_uses_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASC_UNIT_SECRET", "sk-from-os-environ")
    assert resolve_secret(CredentialRef("x", env="ASC_UNIT_SECRET")).reveal() == (
        "sk-from-os-environ")


@pytest.mark.parametrize("environ", [{}, {"OPENAI_KEY": ""}])
def test_resolve_secret_missing_env(environ: dict[str, str]) -> None:
    with pytest.raises(SecretUnavailable) as caught:
        resolve_secret(CredentialRef("openai", env="OPENAI_KEY"), environ)
    assert str(caught.value) == "secret 'openai': environment variable OPENAI_KEY is not set"


@pytest.mark.parametrize(("content", "value"), [
    ("sk-file\n", "sk-file"),
    ("sk-file\r\n", "sk-file"),
    ("sk-file", "sk-file"),
    ("sk-file\n\n", "sk-file"),
    (" sk-file \n", " sk-file "),
])
def test_resolve_secret_from_file(tmp_path: Path, content: str, value: str) -> None:
    path = tmp_path / "key"
    path.write_bytes(content.encode())
    assert resolve_secret(CredentialRef("openai", file=path)).reveal() == value


def test_resolve_secret_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    with pytest.raises(SecretUnavailable) as caught:
        resolve_secret(CredentialRef("openai", file=path))
    assert str(caught.value) == f"secret 'openai': cannot read {path}: No such file or directory"


def test_resolve_secret_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(SecretUnavailable) as caught:
        resolve_secret(CredentialRef("openai", file=path))
    assert str(caught.value) == f"secret 'openai': file {path} is empty"


def test_resolve_secret_no_source() -> None:
    with pytest.raises(SecretUnavailable) as caught:
        resolve_secret(CredentialRef("openai"))
    assert str(caught.value) == "secret 'openai': no source configured"


def test_resolve_secret_error_never_contains_a_value() -> None:
    """An env ref whose *other* variables hold secrets names only the ref."""
    environ = {"OTHER": "sk-canary-value-XYZ"}
    with pytest.raises(SecretUnavailable) as caught:
        resolve_secret(CredentialRef("openai", env="OPENAI_KEY"), environ)
    assert "sk-canary-value-XYZ" not in str(caught.value)
    assert "openai" in str(caught.value)


# -- extproc keys hash ------------------------------------------------------------------


def write_config(tmp_path: Path) -> Path:
    (tmp_path / "pepper.txt").write_text(PEPPER + "\n", encoding="utf-8")
    path = tmp_path / "asc.yaml"
    path.write_text(make_config_text("{file: pepper.txt}", {"acme": "hmac-sha256:v1:" + "0" * 64}),
                    encoding="utf-8")
    return path


def test_keys_hash_reads_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(ACME_KEY + "\n"))
    assert main(["keys", "hash", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out == hash_key(Secret(PEPPER), ACME_KEY) + "\n"
    assert err == ""


def test_keys_hash_empty_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["keys", "hash", "--config", str(config)]) == 2
    assert capsys.readouterr() == ("", "error: no key on standard input (hint: pipe the "
                                       "virtual key in, or use --generate for a new one)\n")


def test_keys_hash_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert main(["keys", "hash", "--config", str(config), "--generate"]) == 0
    out, err = capsys.readouterr()
    key_line, hash_line = out.splitlines()
    assert key_line.startswith("key:  sk-asc-")
    key = key_line.removeprefix("key:  ")
    assert len(key) == len("sk-asc-") + 43  # token_urlsafe(32)
    assert hash_line == "hash: " + hash_key(Secret(PEPPER), key)
    assert err == ""


def test_keys_hash_missing_pepper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    (tmp_path / "pepper.txt").unlink()
    monkeypatch.setattr(sys, "stdin", io.StringIO(ACME_KEY + "\n"))
    assert main(["keys", "hash", "--config", str(config)]) == 2
    pepper_path = tmp_path / "pepper.txt"
    assert capsys.readouterr() == (
        "", f"error: secret 'pepper': cannot read {pepper_path}: No such file or directory "
            "(hint: set the variable or create the file the config names)\n")
