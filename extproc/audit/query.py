"""`extproc audit query`: find records by tenant and time, request id, credential, model,
provider or region, through a sqlite index beside each JSONL file.

Each `audit-*.jsonl` gets `audit-*.jsonl.idx` (sqlite): one row per record with the
queried fields and the record's byte offset. The index is brought up to date before each
query, incrementally (it remembers how many bytes it has read), so a growing file costs
only its new lines; `extproc audit index` does the same ahead of time. The index is a
cache: delete it and it is rebuilt; the JSONL file stays the evidence (a hit is read back
from the file, and `verify` never reads the index).
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final

from extproc.audit.verify import log_files

__all__ = ["Query", "TimeWindow", "index_file", "parse_at", "parse_time", "query"]

_INDEX_SUFFIX: Final = ".idx"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    offset INTEGER PRIMARY KEY, start_ns INTEGER, end_ns INTEGER, request_id TEXT,
    tenant TEXT, credential TEXT, model TEXT, model_served TEXT, provider TEXT,
    region TEXT, status INTEGER);
CREATE INDEX IF NOT EXISTS by_tenant_time ON records (tenant, start_ns);
CREATE INDEX IF NOT EXISTS by_time ON records (start_ns);
CREATE INDEX IF NOT EXISTS by_request ON records (request_id);
CREATE INDEX IF NOT EXISTS by_credential ON records (credential, start_ns);
"""
_BATCH: Final = 10_000
_WHEN: Final = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2})(?::(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?)?)?"
    r"(Z|[+-]\d{2}:?\d{2})?$")
_MAX_SPAN_NS: Final = 24 * 3600 * 10**9
"""A request lasts less than this: `--at` looks back this far for requests still running."""


@dataclass(frozen=True, slots=True)
class TimeWindow:
    start_ns: int
    end_ns: int
    """Exclusive."""


def parse_time(text: str) -> TimeWindow:
    """An ISO time in UTC (or with an offset) as the window of its precision:
    `2026-11-25T10:00Z` is that minute, `2026-11-25` that day."""
    match = _WHEN.match(text.strip())
    if match is None:
        raise ValueError(f"not a time: {text!r} (e.g. 2026-11-25T10:00Z)")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tz: timezone = UTC
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        tz = UTC if digits == "0000" else _offset(sign * (int(digits[:2]) * 60 + int(digits[2:])))
    start = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                     int(second or 0), tzinfo=tz)
    if fraction:
        nanos = int(fraction.ljust(9, "0"))
        start_ns = _ns(start) + nanos
        return TimeWindow(start_ns, start_ns + 10 ** (9 - len(fraction)))
    step = (timedelta(seconds=1) if second else timedelta(minutes=1) if minute
            else timedelta(hours=1) if hour else timedelta(days=1))
    return TimeWindow(_ns(start), _ns(start + step))


def parse_at(text: str) -> TimeWindow:
    return parse_time(text)


def _offset(minutes: int) -> timezone:
    return timezone(timedelta(minutes=minutes))


def _ns(moment: datetime) -> int:
    return int(moment.timestamp()) * 10**9 + moment.microsecond * 1000


def _index_path(log: Path) -> Path:
    return log.with_name(log.name + _INDEX_SUFFIX)


def _row(offset: int, entry: dict[str, Any]) -> tuple[Any, ...]:
    route = entry.get("route") or {}
    start = int(entry.get("time_ns") or 0)
    latency_ms = entry.get("latency_ms") or 0
    return (offset, start, start + int(float(latency_ms) * 1_000_000),
            entry.get("request_id"), entry.get("tenant"), entry.get("credential"),
            entry.get("model_asked"), entry.get("model_served"), route.get("provider"),
            route.get("region"), entry.get("status"))


def index_file(log: Path) -> sqlite3.Connection:
    """The up-to-date index of `log` (built or extended from where it stopped)."""
    db = sqlite3.connect(_index_path(log))
    db.executescript(_SCHEMA)
    row = db.execute("SELECT v FROM meta WHERE k = 'bytes'").fetchone()
    done = int(row[0]) if row else 0
    size = log.stat().st_size
    if size < done:  # the file is not the one indexed (replaced): start over
        db.executescript("DELETE FROM records; DELETE FROM meta;")
        done = 0
    if size == done:
        return db
    rows: list[tuple[Any, ...]] = []
    with log.open("rb") as lines:
        lines.seek(done)
        offset = done
        for raw in lines:
            if not raw.endswith(b"\n"):
                break  # a line still being written: next time
            if b'"type":"record"' in raw:
                # A broken line is not the index's business: `verify` reports it.
                with contextlib.suppress(ValueError, TypeError):
                    rows.append(_row(offset, json.loads(raw)))
            offset += len(raw)
            if len(rows) >= _BATCH:
                db.executemany("INSERT OR REPLACE INTO records VALUES "
                               "(?,?,?,?,?,?,?,?,?,?,?)", rows)
                rows.clear()
    db.executemany("INSERT OR REPLACE INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('bytes', ?)", (offset,))
    db.commit()
    return db


@dataclass(frozen=True, slots=True)
class Query:
    tenant: str | None = None
    at: TimeWindow | None = None
    """Records of requests running at some moment of this window."""
    since: TimeWindow | None = None
    until: TimeWindow | None = None
    request_id: str | None = None
    credential: str | None = None
    model: str | None = None
    """Asked or served."""
    provider: str | None = None
    region: str | None = None
    limit: int = 1000

    def sql(self) -> tuple[str, list[Any]]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("tenant", self.tenant), ("request_id", self.request_id),
                              ("credential", self.credential), ("provider", self.provider),
                              ("region", self.region)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if self.model is not None:
            where.append("(model = ? OR model_served = ?)")
            args += [self.model, self.model]
        if self.at is not None:
            # started before the window ends and ended after it starts; the start bound
            # keeps it an index range scan
            where.append("start_ns >= ? AND start_ns < ? AND end_ns >= ?")
            args += [self.at.start_ns - _MAX_SPAN_NS, self.at.end_ns, self.at.start_ns]
        if self.since is not None:
            where.append("start_ns >= ?")
            args.append(self.since.start_ns)
        if self.until is not None:
            where.append("start_ns < ?")
            args.append(self.until.end_ns)
        clause = " WHERE " + " AND ".join(where) if where else ""
        return (f"SELECT offset FROM records{clause} ORDER BY start_ns LIMIT ?",  # noqa: S608
                [*args, self.limit])


def query(paths: Iterable[Path], question: Query) -> Iterator[dict[str, Any]]:
    """Matching records, read back from the JSONL files (each file's hits by start time)."""
    statement, args = question.sql()
    left = question.limit
    for log in log_files(paths):
        if left <= 0:
            return
        db = index_file(log)
        try:
            offsets = [row[0] for row in db.execute(statement, args)]
        finally:
            db.close()
        if not offsets:
            continue
        with log.open("rb") as lines:
            for offset in offsets[:left]:
                lines.seek(offset)
                yield json.loads(lines.readline())
                left -= 1
