"""The audit chain and `verify`: an untouched log verifies (also across an HMAC key
rotation and a writer restart); every kind of tampering fails and names its position
(file:line, writer, seq), with the HMAC keys and with the public key only.

The logs are written by the real `AuditWriter` and `JsonlAuditSink` into tmp_path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from extproc.audit.chain import Chain, HmacKey, SigningKey, canonical, load_public_keys
from extproc.audit.keys import create_key, load_keys
from extproc.audit.sinks import JsonlAuditSink
from extproc.audit.verify import Report, log_files, verify_paths
from extproc.audit.writer import AuditWriter
from extproc.config import AuditSettings
from extproc.credentials.kek import FileKek, init_kek_file


def record(n: int) -> dict[str, Any]:
    return {"v": 1, "time_ns": 1_700_000_000_000_000_000 + n, "request_id": f"req-{n:04d}",
            "tenant": "acme", "status": 200, "cost_micro_usd": n}


async def write_log(directory: Path, count: int, *, kek: FileKek | None = None,
                    rotate_key_at: int | None = None, checkpoint_every: int = 4,
                    rotate_bytes: int = 1 << 30, first: int = 0,
                    batch_records: int = 512) -> AuditWriter:
    """One writer: `count` records, then close (final checkpoint)."""
    settings = AuditSettings(dir=directory, checkpoint_every=checkpoint_every,
                             rotate_bytes=rotate_bytes, fsync="none",
                             batch_records=batch_records)
    signer = SigningKey.load_or_create(directory / "signing.key")
    signer.publish(directory / "audit.pub")
    key = await create_key(directory, kek) if first == 0 else None
    if key is None:
        keys = await load_keys(directory, kek)
        kid = sorted(keys)[-1]
        key = HmacKey(kid, keys[kid])
    chain = Chain(key, signer)
    sink = JsonlAuditSink(directory, chain.writer, rotate_bytes=rotate_bytes,
                          rotate_s=86_400, fsync="none")
    rotated: list[Any] = []

    async def next_key() -> Any:
        return rotated[-1] if rotated else None

    writer = AuditWriter(settings, chain, [sink], next_key=next_key)
    writer.start()
    for n in range(first, first + count):
        if rotate_key_at is not None and n == rotate_key_at:
            rotated.append(await create_key(directory, kek))
        await writer.submit(record(n))
    await writer.close()
    return writer


async def verify(directory: Path, *, with_macs: bool = True, kek: FileKek | None = None,
                 allow_open: bool = False) -> Report:
    public = load_public_keys(directory / "audit.pub")
    macs = await load_keys(directory, kek) if with_macs else None
    return verify_paths([directory], public, macs, allow_open=allow_open)


def lines_of(directory: Path) -> tuple[Path, list[str]]:
    (path,) = log_files([directory])
    return path, path.read_text(encoding="utf-8").splitlines(keepends=True)


def record_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if '"type":"record"' in line]


@pytest.fixture
def kek(tmp_path: Path) -> FileKek:
    path = init_kek_file(tmp_path / "kek.key")
    return FileKek.load(path)


async def test_untouched_log_verifies_with_and_without_hmac_keys(
        tmp_path: Path, kek: FileKek) -> None:
    directory = tmp_path / "audit"
    await write_log(directory, 10, kek=kek)
    _, lines = lines_of(directory)
    entries = [json.loads(line) for line in lines]
    assert [e["type"] for e in entries].count("record") == 10
    assert [e["seq"] for e in entries if e["type"] == "record"] == list(range(1, 11))
    # opening checkpoint (seq 0), one every 4 records, the final one
    assert [(e["seq"], e["final"]) for e in entries if e["type"] == "checkpoint"] == [
        (0, False), (4, False), (8, False), (10, True)]
    full = await verify(directory, kek=kek)
    assert full.ok, [str(p) for p in full.problems]
    assert (full.records, full.checkpoints, full.writers, full.macs_checked) == (10, 4, 1, True)
    public_only = await verify(directory, with_macs=False)
    assert public_only.ok
    assert public_only.macs_checked is False


async def test_verifies_across_key_rotation_and_restart(tmp_path: Path, kek: FileKek) -> None:
    directory = tmp_path / "audit"
    await write_log(directory, 10, kek=kek, rotate_key_at=5)
    await write_log(directory, 6, kek=kek, first=10)  # a restart: a new writer segment
    files = log_files([directory])
    assert len(files) == 2
    kids = {json.loads(line)["kid"] for f in files for line in f.read_text().splitlines()
            if '"type":"record"' in line}
    assert len(kids) == 2
    report = await verify(directory, kek=kek)
    assert report.ok, [str(p) for p in report.problems]
    assert (report.records, report.writers) == (16, 2)


async def test_rotation_of_files_keeps_one_chain(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    await write_log(directory, 30, rotate_bytes=4096, batch_records=3)
    files = log_files([directory])
    assert len(files) >= 2
    report = await verify(directory)
    assert report.ok, [str(p) for p in report.problems]
    assert report.records == 30
    # each file but the last ends with a checkpoint
    for path in files:
        assert json.loads(path.read_text().splitlines()[-1])["type"] == "checkpoint"
    files[1].unlink()  # a whole rotated file removed: the gap is named
    report = await verify(directory)
    assert not report.ok
    assert "missing records" in report.problems[0].message


def _edit_field(lines: list[str]) -> int:
    i = record_lines(lines)[5]
    entry = json.loads(lines[i])
    entry["tenant"] = "globex"
    lines[i] = json.dumps(entry, separators=(",", ":")) + "\n"
    return i


def _delete(lines: list[str]) -> int:
    i = record_lines(lines)[5]
    del lines[i]
    return i


def _swap(lines: list[str]) -> int:
    i, j = record_lines(lines)[5], record_lines(lines)[6]
    lines[i], lines[j] = lines[j], lines[i]
    return i


def _insert_forged(lines: list[str]) -> int:
    i = record_lines(lines)[5]
    before = json.loads(lines[record_lines(lines)[4]])
    forged = {**record(999), "type": "record", "writer": before["writer"],
              "seq": before["seq"] + 1, "kid": before["kid"], "prev": before["mac"],
              "mac": "0" * 64}
    lines.insert(i, json.dumps(forged, separators=(",", ":")) + "\n")
    return i


def _truncate_tail(lines: list[str]) -> int:
    del lines[-3:]
    return len(lines) - 1


def _truncate_mid_line(lines: list[str]) -> int:
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    return len(lines) - 1


def _replace_checkpoint(lines: list[str]) -> int:
    i = next(k for k, line in enumerate(lines)
             if '"type":"checkpoint"' in line and '"seq":8' in line)
    entry = json.loads(lines[i])
    entry["head"] = "f" * 64
    lines[i] = json.dumps(entry, separators=(",", ":")) + "\n"
    return i


def _checkpoint_from_another_writer(lines: list[str]) -> int:
    """A genuinely signed checkpoint, but of another point of the chain (replayed)."""
    i = next(k for k, line in enumerate(lines)
             if '"type":"checkpoint"' in line and '"seq":8' in line)
    earlier = next(line for line in lines if '"type":"checkpoint"' in line
                   and '"seq":4' in line)
    lines[i] = earlier
    return i


TAMPERS: dict[str, Callable[[list[str]], int]] = {
    "edit a field": _edit_field,
    "delete a record": _delete,
    "swap two records": _swap,
    "insert a forged record": _insert_forged,
    "truncate the tail": _truncate_tail,
    "truncate mid-line": _truncate_mid_line,
    "replace a checkpoint": _replace_checkpoint,
    "replay an older checkpoint": _checkpoint_from_another_writer,
}


@pytest.mark.parametrize("with_macs", [True, False], ids=["hmac", "public-key-only"])
@pytest.mark.parametrize("tamper", list(TAMPERS), ids=list(TAMPERS))
async def test_every_tampering_fails_and_names_its_position(
        tmp_path: Path, kek: FileKek, tamper: str, with_macs: bool) -> None:
    directory = tmp_path / "audit"
    await write_log(directory, 12, kek=kek)
    path, lines = lines_of(directory)
    index = TAMPERS[tamper](lines)
    path.write_text("".join(lines), encoding="utf-8")
    report = await verify(directory, with_macs=with_macs, kek=kek)
    assert not report.ok
    first = report.problems[0]
    assert first.position.file == str(path)
    if not with_macs and tamper == "insert a forged record":
        # A well-linked forgery: without the HMAC key the break shows at the genuine
        # record after it (seq 6 follows the forged seq 6).
        assert (first.position.line, first.seq) == (index + 2, 6)
    elif with_macs or tamper != "edit a field":
        # exactly the line touched
        assert first.position.line == index + 1, [str(p) for p in report.problems]
    else:
        # the public key pins content at the next checkpoint: it names that one (seq 8)
        assert "digest" in first.message
        assert first.seq == 8
    assert str(first).startswith(f"{path}:{first.position.line}")


async def test_mac_names_the_edited_record_after_the_last_checkpoint(
        tmp_path: Path, kek: FileKek) -> None:
    """An edit after the last periodic checkpoint: the HMAC names the record itself."""
    directory = tmp_path / "audit"
    await write_log(directory, 10, kek=kek)
    path, lines = lines_of(directory)
    i = record_lines(lines)[9]  # seq 10, after checkpoint 8
    entry = json.loads(lines[i])
    entry["cost_micro_usd"] = 0
    lines[i] = json.dumps(entry, separators=(",", ":")) + "\n"
    path.write_text("".join(lines), encoding="utf-8")
    report = await verify(directory, kek=kek)
    assert (report.problems[0].position.line, report.problems[0].seq) == (i + 1, 10)
    assert "MAC mismatch" in report.problems[0].message


async def test_open_writer_is_reported_unless_allowed(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    await write_log(directory, 5)
    path, lines = lines_of(directory)
    path.write_text("".join(lines[:-1]), encoding="utf-8")  # drop the final checkpoint
    assert "no final checkpoint after seq 5" in (await verify(directory)).problems[0].message
    report = await verify(directory, allow_open=True)
    assert report.ok
    assert len(report.open_writers) == 1


def test_a_signing_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signing.key"
    SigningKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    with pytest.raises(ValueError, match="must be readable by its owner only"):
        SigningKey.load_or_create(path)


def test_a_sealed_records_line_is_the_entry_and_its_mac_covers_the_canonical_bytes(
        tmp_path: Path) -> None:
    from extproc.audit.chain import canonical, record_mac
    from extproc.audit.sinks import entry_line

    key = HmacKey("k1", b"\x01" * 32)
    chain = Chain(key, SigningKey.load_or_create(tmp_path / "signing.key"))
    entry = chain.seal({"request_id": "r1", "tenant": "ünï", "latency_s": 1e-05,
                        "attempts": [{"status": 200}], "cost": None})

    line = entry_line(entry)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line) == dict(entry)
    assert record_mac(key.key, json.loads(line)) == entry["mac"]
    mac = entry["mac"].encode()
    assert line == canonical(dict(entry), without="mac")[:-1] + b',"mac":"' + mac + b'"}\n'


_JSON_LEAVES = (st.none() | st.booleans() | st.integers()
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.floats(min_value=-1e-3, max_value=1e-3) | st.text())
_JSON = st.recursive(_JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(), inner, max_size=4), max_leaves=24)


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.text(), _JSON, max_size=8))
@example({"mac": "ab", "seq": 1})
def test_canonical_bytes_are_the_json_dumps_form_for_any_json(entry: dict[str, Any]) -> None:
    """Old logs must keep verifying: the fast encoder may never change a canonical byte
    (small floats, huge integers, control characters, astral keys included)."""
    body = {k: v for k, v in entry.items() if k != "mac"}
    try:
        expected = json.dumps(body, sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: neither encoder writes it
        with pytest.raises(UnicodeEncodeError):
            canonical(entry, without="mac")
        return
    assert canonical(entry, without="mac") == expected


def test_canonical_bytes_of_the_floats_and_integers_orjson_writes_differently() -> None:
    entry = {"small": 7e-05, "tiny": -1.5e-300, "big": 2**64 + 1, "neg": -(2**70),
             "edge": 1e-4, "huge": 1e16, "ms": 5.522, "digits": 6.7551124758991575e-09}
    assert canonical(entry, without="mac") == (
        b'{"big":18446744073709551617,"digits":6.7551124758991575e-09,"edge":0.0001,'
        b'"huge":1e+16,"ms":5.522,"neg":-1180591620717411303424,"small":7e-05,'
        b'"tiny":-1.5e-300}')
