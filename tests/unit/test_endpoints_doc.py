"""docs/providers.md's endpoint x backend table is the code's table
(`extproc.endpoints.SUPPORT`, rows from `ENDPOINTS`): every row, column and cell."""

from __future__ import annotations

import re
from pathlib import Path

from extproc.endpoints import ENDPOINTS, SUPPORT, Support
from extproc.translate.base import Backend

PROVIDERS_DOC = Path(__file__).resolve().parents[2] / "docs" / "providers.md"
_ROW = re.compile(r"^\|(.+)\|\s*$")


def documented_table() -> dict[str, dict[str, str]]:
    """{endpoint cell: {backend column: cell}} from the table under `## Endpoints`."""
    text = PROVIDERS_DOC.read_text(encoding="utf-8")
    section = text.split("\n## Endpoints\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in match.group(1).split("|")]
            for line in section.splitlines() if (match := _ROW.match(line))]
    header, _rule, *body = rows
    assert header[0] == "endpoint"
    return {row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in body}


def code_table() -> dict[str, dict[str, str]]:
    return {f"`{spec.display}`": {backend.value: SUPPORT.get(
        (spec.endpoint, backend), Support.REFUSED).value for backend in Backend}
        for spec in ENDPOINTS.values()}


def test_the_documented_endpoint_table_is_the_codes() -> None:
    assert documented_table() == code_table()


def test_the_table_reads_every_cell() -> None:
    table = documented_table()
    assert table["`POST /v1/embeddings`"]["anthropic"] == "refused"
    assert table["`POST /v1/responses`"]["azure"] == "served"
    assert len(table) == len(ENDPOINTS)
