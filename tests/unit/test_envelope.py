"""Envelope encryption (`extproc.credentials.envelope`) with a file KEK (`kek.FileKek`).

Pure crypto and the local filesystem only: round trips, every way a record can be wrong
(wrong KEK, one flipped bit, copied onto another place, truncated JSON), nonce
uniqueness, KEK file permissions, and that no message or repr ever shows the secret.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from extproc.credentials import envelope
from extproc.credentials.envelope import (
    DecryptionFailed,
    EnvelopeError,
    SealedSecret,
    aad,
    encrypt_payload,
    open_sealed,
    rewrap_sealed,
    seal,
)
from extproc.credentials.kek import FileKek, KekError, init_kek_file
from extproc.secrets import Secret

CANARY = "sk-canary-envelope-" + secrets.token_hex(12)
NOW = 1_795_600_000.0
LABEL = "tenant:acme/openai/acme-primary@3"

def make_kek() -> FileKek:
    return FileKek(os.urandom(32))


async def make_record(kek: FileKek, *, scope: str = "tenant:acme", provider: str = "openai",
                      key_id: str = "acme-primary", version: int = 3,
                      secret: str = CANARY) -> SealedSecret:
    return await seal(kek, scope=scope, provider=provider, key_id=key_id, version=version,
                      secret=Secret(secret), created_at=NOW)


def flip_bit(data: bytes, index: int, bit: int = 0) -> bytes:
    mutable = bytearray(data)
    mutable[index] ^= 1 << bit
    return bytes(mutable)


async def open_fails(kek: FileKek, record: SealedSecret) -> DecryptionFailed:
    with pytest.raises(DecryptionFailed) as caught:
        await open_sealed(kek, record)
    return caught.value


# --- round trip ---------------------------------------------------------------------------


async def test_seal_and_open_round_trip() -> None:
    kek = make_kek()
    record = await make_record(kek)

    opened = await open_sealed(kek, record)

    assert opened.reveal() == CANARY
    assert record.fingerprint == Secret(CANARY).fingerprint()
    assert re.fullmatch(r"file:sha256:[0-9a-f]{12}", kek.kek_id)
    assert (record.format_version, record.scope, record.provider, record.key_id,
            record.version, record.kek_id, record.created_at) == (
        1, "tenant:acme", "openai", "acme-primary", 3, kek.kek_id, NOW)
    assert len(record.nonce) == 12
    assert len(record.ciphertext) == len(CANARY) + 16  # GCM tag
    assert len(record.wrapped_dek) == 1 + 12 + 32 + 16  # format, nonce, DEK, tag
    assert record.wrapped_dek[0] == 1
    assert CANARY.encode() not in record.ciphertext


async def test_json_round_trip_is_exact_and_opens() -> None:
    kek = make_kek()
    record = await make_record(kek, scope="global", provider="anthropic", key_id="k.1_a-b",
                               version=1)

    text = record.to_json()
    parsed = SealedSecret.from_json(text)

    assert parsed == record
    assert (await open_sealed(kek, parsed)).reveal() == CANARY
    assert sorted(json.loads(text)) == ["ciphertext", "created_at", "fingerprint", "format",
                                        "kek_id", "key_id", "nonce", "provider", "scope",
                                        "version", "wrapped_dek"]
    assert json.loads(text)["format"] == 1


async def test_unicode_secret_round_trips() -> None:
    kek = make_kek()
    record = await make_record(kek, secret=CANARY + "-ключ-🔑")
    assert (await open_sealed(kek, record)).reveal() == CANARY + "-ключ-🔑"


async def test_each_seal_uses_a_fresh_dek_and_nonce() -> None:
    kek = make_kek()
    first, second = await make_record(kek), await make_record(kek)
    assert first.nonce != second.nonce
    assert first.ciphertext != second.ciphertext
    assert first.wrapped_dek != second.wrapped_dek


async def test_repr_shows_ids_and_fingerprint_only() -> None:
    kek = make_kek()
    record = await make_record(kek)

    text = repr(record)

    assert text == (f"SealedSecret({LABEL}, kek={kek.kek_id}, "
                    f"fingerprint={Secret(CANARY).fingerprint()})")
    assert str(record) == text
    assert repr(kek) == f"FileKek({kek.kek_id})"


async def test_empty_secret_is_refused() -> None:
    with pytest.raises(EnvelopeError, match=r"^cannot seal global/openai/k1@1: the secret is "
                                            r"empty$"):
        await seal(make_kek(), scope="global", provider="openai", key_id="k1", version=1,
                   secret=Secret(""))


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("scope", "tenant:", "scope must be 'global' or 'tenant:<id>'"),
    ("scope", "tenants:acme", "scope must be 'global' or 'tenant:<id>'"),
    ("provider", "open ai", "provider is not a valid name"),
    ("key_id", "", "key_id is not a valid name"),
    ("version", 0, "version must be an integer >= 1"),
])
async def test_invalid_names_are_refused_before_any_kek_call(field: str, value: Any,
                                                            problem: str) -> None:
    names: dict[str, Any] = {"scope": "global", "provider": "openai", "key_id": "k1",
                             "version": 1, field: value}
    with pytest.raises(EnvelopeError, match=f"^invalid record name: {re.escape(problem)}$"):
        await seal(make_kek(), secret=Secret(CANARY), **names)


# --- failures to open -------------------------------------------------------------------------


async def test_wrong_kek_is_refused_by_id() -> None:
    record = await make_record(make_kek())
    other = make_kek()

    failure = await open_fails(other, record)

    assert failure.reason == "kek_mismatch"
    assert str(failure) == (f"cannot open {LABEL}: sealed under KEK {record.kek_id}, but this "
                            f"gateway holds KEK {other.kek_id}")


async def test_wrong_kek_with_forged_id_fails_authentication() -> None:
    other = make_kek()
    record = dataclasses.replace(await make_record(make_kek()), kek_id=other.kek_id)

    failure = await open_fails(other, record)

    assert failure.reason == "unwrap"
    assert str(failure) == (f"cannot open {LABEL}: DEK unwrap failed: file KEK unwrap failed: "
                            "authentication failed (wrong KEK, wrong context or tampered "
                            "wrapped DEK)")
    assert isinstance(failure.__cause__, KekError)


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "wrapped_dek"])
@pytest.mark.parametrize("position", ["first", "middle", "last"])
async def test_one_flipped_bit_is_detected(field: str, position: str) -> None:
    kek = make_kek()
    record = await make_record(kek)
    data: bytes = getattr(record, field)
    index = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[position]
    change: dict[str, Any] = {field: flip_bit(data, index, bit=index % 8)}
    tampered = dataclasses.replace(record, **change)

    failure = await open_fails(kek, tampered)

    if field == "wrapped_dek":
        assert failure.reason == "unwrap"
        assert str(failure).startswith(f"cannot open {LABEL}: DEK unwrap failed: file KEK "
                                       "unwrap failed: ")
    else:
        assert failure.reason == "ciphertext"
        assert str(failure) == (f"cannot open {LABEL}: ciphertext authentication failed "
                                "(tampered ciphertext or nonce, or record moved)")


MOVES: dict[str, dict[str, Any]] = {
    "to another tenant": {"scope": "tenant:globex"},
    "to global scope": {"scope": "global"},
    "to another provider": {"provider": "anthropic"},
    "to another key id": {"key_id": "acme-secondary"},
    "to another version": {"version": 4},
}


@pytest.mark.parametrize("move", list(MOVES))
async def test_record_copied_elsewhere_does_not_open(move: str) -> None:
    kek = make_kek()
    moved = dataclasses.replace(await make_record(kek), **MOVES[move])

    failure = await open_fails(kek, moved)

    assert failure.reason == "unwrap"
    assert str(failure).startswith(f"cannot open {moved.label}: DEK unwrap failed: ")


@pytest.mark.parametrize("move", list(MOVES))
async def test_payload_aad_binds_even_if_the_dek_is_rewrapped_for_the_new_place(
        move: str) -> None:
    """Both layers bind the place: a KEK holder who re-wraps the DEK still cannot move it."""
    kek = make_kek()
    record = await make_record(kek)
    moved = dataclasses.replace(record, **MOVES[move])
    dek = await kek.unwrap(record.wrapped_dek,
                           aad(record.scope, record.provider, record.key_id, record.version))
    moved = dataclasses.replace(moved, wrapped_dek=await kek.wrap(
        dek, aad(moved.scope, moved.provider, moved.key_id, moved.version)))

    failure = await open_fails(kek, moved)

    assert failure.reason == "ciphertext"


async def test_wrong_fingerprint_is_detected() -> None:
    kek = make_kek()
    record = dataclasses.replace(await make_record(kek), fingerprint="sha256:000000000000")

    failure = await open_fails(kek, record)

    assert failure.reason == "fingerprint"
    assert str(failure) == (f"cannot open {LABEL}: fingerprint does not match the decrypted "
                            "secret")


async def test_unknown_format_version_does_not_open() -> None:
    kek = make_kek()
    record = dataclasses.replace(await make_record(kek), format_version=2)

    failure = await open_fails(kek, record)

    assert failure.reason == "format"
    assert str(failure) == f"cannot open {LABEL}: unsupported record format 2"


# --- stored records -----------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 1, 10, 100, -40, -2, -1])
async def test_truncated_json_record_is_malformed(keep: int) -> None:
    text = (await make_record(make_kek())).to_json()

    with pytest.raises(EnvelopeError, match=r"^malformed record: ") as caught:
        SealedSecret.from_json(text[:keep])

    assert not isinstance(caught.value, DecryptionFailed)


def _edit(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def apply(document: dict[str, Any]) -> None:
        for name, value in changes.items():
            if value is _DELETE:
                del document[name]
            else:
                document[name] = value
    return apply


_DELETE = object()


GARBLED: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "nonce not base64": (_edit(nonce="***"), "malformed record: nonce is not valid base64"),
    "nonce too short": (_edit(nonce="AAAA"), "malformed record: nonce must be 12 bytes"),
    "ciphertext padding cut": (
        lambda d: d.update(ciphertext=d["ciphertext"][:-1]),
        "malformed record: ciphertext is not valid base64"),
    "ciphertext empty": (_edit(ciphertext=""),
                         "malformed record: ciphertext is shorter than its authentication tag"),
    "wrapped DEK empty": (_edit(wrapped_dek=""),
                          "malformed record: wrapped_dek is missing or too long"),
    "field missing": (_edit(kek_id=_DELETE), "malformed record: missing fields kek_id"),
    "field unknown": (_edit(plaintext="x"), "malformed record: unknown fields plaintext"),
    "version zero": (_edit(version=0), "malformed record: version must be an integer >= 1"),
    "version bool": (_edit(version=True), "malformed record: version is not an integer"),
    "version string": (_edit(version="3"), "malformed record: version is not an integer"),
    "bad scope": (_edit(scope="acme"),
                  "malformed record: scope must be 'global' or 'tenant:<id>'"),
    "bad fingerprint": (_edit(fingerprint="md5:00"),
                        "malformed record: fingerprint must look like sha256:<12 hex>"),
    "created_at string": (_edit(created_at="now"),
                          "malformed record: created_at is not a number"),
    "format missing": (_edit(format=_DELETE),
                       "malformed record: format is missing or not an integer"),
    "format 2": (_edit(format=2),
                 "unsupported record format 2; this gateway reads format 1"),
}


@pytest.mark.parametrize("case", list(GARBLED))
async def test_garbled_json_record_is_refused_with_exact_message(case: str) -> None:
    edit, message = GARBLED[case]
    document = json.loads((await make_record(make_kek())).to_json())
    edit(document)

    with pytest.raises(EnvelopeError) as caught:
        SealedSecret.from_json(json.dumps(document))

    assert str(caught.value) == message


@pytest.mark.parametrize("text", ["[]", "null", '"record"', "", b"\xff\xfe\xfa"])
def test_json_that_is_not_an_object_is_malformed(text: str | bytes) -> None:
    with pytest.raises(EnvelopeError, match=r"^malformed record: "):
        SealedSecret.from_json(text)


def test_aad_is_canonical_and_unambiguous() -> None:
    assert aad("tenant:acme", "openai", "k1", 2) == (
        b'{"format":1,"key_id":"k1","provider":"openai","purpose":"asc-provider-secret",'
        b'"scope":"tenant:acme","version":2}')
    variants = {aad(scope, provider, key_id, version)
                for scope in ("global", "tenant:a", "tenant:ab")
                for provider in ("a", "ab", "b")
                for key_id in ("a", "ab", "b")
                for version in (1, 2, 12)}
    assert len(variants) == 3 * 3 * 3 * 3


# --- nonces -----------------------------------------------------------------------------------


def test_nonces_are_unique_over_100k_encryptions_under_one_dek() -> None:
    dek = os.urandom(32)
    context = aad("global", "openai", "k1", 1)

    nonces = {encrypt_payload(dek, b"x", context)[0] for _ in range(100_000)}

    assert len(nonces) == 100_000


async def test_seal_draws_its_nonce_from_encrypt_payload(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The 100k test above covers `seal` only if `seal` encrypts through that helper."""
    calls: list[bytes] = []

    def spy(dek: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        nonce, ciphertext = encrypt_payload(dek, plaintext, aad)
        calls.append(nonce)
        return nonce, ciphertext

    monkeypatch.setattr(envelope, "encrypt_payload", spy)
    record = await make_record(make_kek())

    assert calls == [record.nonce]


# --- KEK rotation -----------------------------------------------------------------------------


async def test_rewrap_with_a_file_kek_changes_only_the_wrapped_dek() -> None:
    kek = make_kek()
    record = await make_record(kek)

    rewrapped = await rewrap_sealed(kek, record)

    assert rewrapped.wrapped_dek != record.wrapped_dek
    assert dataclasses.replace(rewrapped, wrapped_dek=record.wrapped_dek) == record
    assert (await open_sealed(kek, rewrapped)).reveal() == CANARY


async def test_rewrap_under_another_kek_is_refused() -> None:
    record = await make_record(make_kek())
    other = make_kek()
    with pytest.raises(EnvelopeError) as caught:
        await rewrap_sealed(other, record)
    assert str(caught.value) == (f"cannot rewrap {LABEL}: sealed under KEK "
                                           f"{record.kek_id}, not {other.kek_id}")


# --- KEK file ---------------------------------------------------------------------------------


def test_init_kek_file_creates_a_private_32_byte_key(tmp_path: Path) -> None:
    path = init_kek_file(tmp_path / "kek.key")

    assert path == tmp_path / "kek.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_bytes()) == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kek.key"]  # no temp file left
    assert FileKek.load(path).kek_id == FileKek(path.read_bytes()).kek_id


def test_init_kek_file_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        path = init_kek_file(tmp_path / "kek.key")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o600


def test_init_kek_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = init_kek_file(tmp_path / "kek.key")
    original = path.read_bytes()

    with pytest.raises(KekError) as caught:
        init_kek_file(path)

    assert str(caught.value) == f"KEK file {path} already exists; refusing to overwrite it"
    assert path.read_bytes() == original


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610])
def test_kek_file_readable_or_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = init_kek_file(tmp_path / "kek.key")
    path.chmod(mode)

    with pytest.raises(KekError) as caught:
        FileKek.load(path)

    assert str(caught.value) == (f"KEK file {path} has mode {mode:04o}; it must be 0600 "
                                 f"(chmod 600 {path})")


def test_kek_file_mode_messages_are_exact_for_0644_and_0640(tmp_path: Path) -> None:
    path = init_kek_file(tmp_path / "kek.key")
    for mode, shown in ((0o644, "0644"), (0o640, "0640")):
        path.chmod(mode)
        with pytest.raises(KekError) as caught:
            FileKek.load(path)
        assert str(caught.value) == (f"KEK file {path} has mode {shown}; it must be 0600 "
                                     f"(chmod 600 {path})")


@pytest.mark.parametrize("mode", [0o600, 0o400])
async def test_kek_file_private_to_its_owner_is_accepted(tmp_path: Path, mode: int) -> None:
    path = init_kek_file(tmp_path / "kek.key")
    path.chmod(mode)

    kek = FileKek.load(path)

    record = await make_record(kek)
    assert (await open_sealed(FileKek.load(path), record)).reveal() == CANARY


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_kek_file_of_the_wrong_length_is_refused(tmp_path: Path, size: int) -> None:
    path = tmp_path / "kek.key"
    path.write_bytes(os.urandom(size))
    path.chmod(0o600)

    with pytest.raises(KekError) as caught:
        FileKek.load(path)

    found = "more" if size > 32 else str(size)
    assert str(caught.value) == (f"KEK file {path} must hold exactly 32 bytes (found {found}); "
                                 "it is not a KEK created by `extproc keys init-kek`")


def test_missing_kek_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    with pytest.raises(KekError) as caught:
        FileKek.load(path)
    assert str(caught.value) == (f"KEK file {path} does not exist (create it with "
                                 "`extproc keys init-kek`)")


def test_kek_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KekError, match="is not a regular file"):
        FileKek.load(tmp_path)


# --- leaks --------------------------------------------------------------------------------------


async def test_no_message_or_repr_contains_the_canary(tmp_path: Path) -> None:
    """Every failure path, every repr and the stored record: none shows the secret."""
    kek = make_kek()
    record = await make_record(kek)
    other = make_kek()
    broken = [
        dataclasses.replace(record, ciphertext=flip_bit(record.ciphertext, 0)),
        dataclasses.replace(record, nonce=flip_bit(record.nonce, 0)),
        dataclasses.replace(record, wrapped_dek=flip_bit(record.wrapped_dek, 5)),
        dataclasses.replace(record, provider="anthropic"),
        dataclasses.replace(record, fingerprint="sha256:000000000000"),
        dataclasses.replace(record, format_version=2),
        dataclasses.replace(record, kek_id=other.kek_id),
    ]
    texts = [repr(record), str(record), record.to_json(), repr(kek), repr(Secret(CANARY))]
    for bad in broken:
        for candidate in (kek, other):
            with pytest.raises(DecryptionFailed) as caught:
                await open_sealed(candidate, bad)
            texts += [str(caught.value), repr(caught.value), str(caught.value.__cause__)]
    with pytest.raises(EnvelopeError) as malformed:
        SealedSecret.from_json(record.to_json()[:-7])
    texts += [str(malformed.value), repr(malformed.value)]

    leaked = [text for text in texts if CANARY in text or CANARY[-12:] in text]

    assert leaked == []
    assert repr(Secret(CANARY)) == "Secret(***)"
