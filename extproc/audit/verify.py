"""`extproc audit verify`: check the chain of every writer in a set of JSONL files.

With the public key(s) only: every checkpoint's Ed25519 signature; the sequence numbers
(no gap, no repeat, no reordering); each record's `prev` against the MAC before it; each
checkpoint's `head` and `digest` against the records before it (so content up to the
last checkpoint is pinned); a final checkpoint closing each writer (else: truncated).
With the HMAC keys as well: each record's MAC, which pins every single record, including
those after the last checkpoint. docs/audit.md lists what each mode proves.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from extproc.audit.chain import (
    genesis_digest,
    next_digest,
    record_mac,
    verify_checkpoint_signature,
)

__all__ = ["Position", "Problem", "Report", "entries_of", "log_files", "verify_paths"]


@dataclass(frozen=True, slots=True)
class Position:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Problem:
    position: Position
    writer: str | None
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.position}"
        if self.writer is not None:
            where += f" writer {self.writer}"
        if self.seq is not None:
            where += f" seq {self.seq}"
        return f"{where}: {self.message}"


@dataclass
class Report:
    records: int = 0
    checkpoints: int = 0
    writers: int = 0
    macs_checked: bool = False
    open_writers: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def log_files(paths: Iterable[Path]) -> list[Path]:
    """Files to read: each file given, and each directory's `audit-*.jsonl`, by name."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(path.glob("audit-*.jsonl")))
        else:
            files.append(path)
    return files


def entries_of(files: Iterable[Path]) -> Iterator[tuple[Position, dict[str, Any] | None]]:
    """(position, entry) per line; entry None for a line that is not a JSON object."""
    for path in files:
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                position = Position(str(path), number)
                try:
                    entry = json.loads(raw)
                except ValueError:
                    yield position, None
                    continue
                yield position, entry if isinstance(entry, dict) else None


@dataclass
class _Writer:
    writer: str
    seq: int = 0
    head: str = ""
    digest: str = ""
    closed: bool = False
    last: Position | None = None
    broken: bool = False


def verify_paths(paths: Iterable[Path], public_keys: dict[str, Ed25519PublicKey],
                 hmac_keys: dict[str, bytes] | None = None, *,
                 allow_open: bool = False) -> Report:
    """Verify every writer found in `paths`; `allow_open` accepts writers still running
    (no final checkpoint yet) - their tail after the last checkpoint is then unproven."""
    report = Report(macs_checked=bool(hmac_keys))
    writers: dict[str, _Writer] = {}

    def problem(position: Position, state: _Writer | None, seq: int | None,
                message: str) -> None:
        report.problems.append(Problem(position, state.writer if state else None, seq,
                                       message))
        if state is not None:
            state.broken = True

    for position, entry in entries_of(log_files(paths)):
        if entry is None:
            problem(position, None, None, "not a JSON object (truncated or edited line)")
            continue
        name = entry.get("writer")
        if not isinstance(name, str):
            problem(position, None, None, "entry without a writer")
            continue
        state = writers.get(name)
        if state is None:
            state = writers[name] = _Writer(name, digest=genesis_digest(name))
        state.last = position
        seq = entry.get("seq")
        if not isinstance(seq, int):
            problem(position, state, None, "entry without a sequence number")
            continue
        if state.closed:
            problem(position, state, seq, "entry after the writer's final checkpoint")
        kind = entry.get("type")
        if kind == "record":
            report.records += 1
            _check_record(entry, seq, state, position, hmac_keys, problem)
        elif kind == "checkpoint":
            report.checkpoints += 1
            _check_checkpoint(entry, seq, state, position, public_keys, problem)
        else:
            problem(position, state, seq, f"unknown entry type {kind!r}")
    report.writers = len(writers)
    for state in writers.values():
        if not state.closed:
            if allow_open:
                report.open_writers.append(state.writer)
            else:
                assert state.last is not None
                problem(state.last, state, state.seq,
                        f"no final checkpoint after seq {state.seq}: the log is cut short "
                        "(or its writer is still running or died)")
    return report


def _check_record(entry: dict[str, Any], seq: int, state: _Writer, position: Position,
                  hmac_keys: dict[str, bytes] | None, problem: Any) -> None:
    if seq != state.seq + 1:
        what = ("missing records (deleted?)" if seq > state.seq + 1
                else "out of order or repeated (reordered or inserted?)")
        problem(position, state, seq, f"seq {seq} where {state.seq + 1} was expected: {what}")
    elif entry.get("prev") != state.head:
        problem(position, state, seq, "prev does not match the previous record's MAC "
                "(a record before it was removed, replaced or inserted)")
    if hmac_keys:
        key = hmac_keys.get(str(entry.get("kid")))
        if key is None:
            problem(position, state, seq, f"unknown HMAC key id {entry.get('kid')!r}")
        elif not hmac.compare_digest(record_mac(key, entry), str(entry.get("mac", ""))):
            problem(position, state, seq, "MAC mismatch: the record was edited or forged")
    # Follow the log as written so that one problem is reported once, not at every
    # later record.
    state.seq = seq
    state.head = str(entry.get("mac", ""))
    state.digest = next_digest(state.digest, entry)


def _check_checkpoint(entry: dict[str, Any], seq: int, state: _Writer, position: Position,
                      public_keys: dict[str, Ed25519PublicKey], problem: Any) -> None:
    why = verify_checkpoint_signature(entry, public_keys)
    if why is not None:
        problem(position, state, seq, f"checkpoint: {why} (replaced or forged checkpoint)")
        return
    if seq != state.seq or entry.get("head") != state.head:
        problem(position, state, seq, f"checkpoint for seq {seq} but the records before it "
                f"end at seq {state.seq}: records deleted, inserted or reordered, or the "
                "checkpoint moved")
    elif entry.get("digest") != state.digest:
        problem(position, state, seq, "checkpoint digest does not match the records "
                "before it: a record up to here was edited")
    # A correctly signed checkpoint is the writer's word: later entries are checked
    # against it, so one problem is not reported again at every later checkpoint.
    state.seq, state.head = seq, str(entry.get("head", ""))
    state.digest = str(entry.get("digest", ""))
    if entry.get("final") is True:
        state.closed = True
