"""The operator docs keep up with the code.

A config field of the published JSON Schema (`deploy/schema/asc.schema.json`, generated
from `extproc.config_schema`) or a metric of `extproc.metrics` without a line in the docs
fails here; so does a field documented in the config reference that the schema does not
have, and a relative link to a file or heading that does not exist.
"""

from __future__ import annotations

import json
import re
from collections import Counter as Tally
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram, Summary

from extproc import metrics
from extproc.config_schema import field_paths

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
CONFIG_REFERENCE = DOCS / "config-reference.md"
CONFIG_SCHEMA = REPO / "deploy" / "schema" / "asc.schema.json"
OPERATOR_GUIDE = DOCS / "operator-guide.md"

# A CommonMark code span: a run of N backticks, then anything, then a run of exactly N.
# Fenced blocks match too (``` ... ```), which keeps their contents out of the checks.
_CODE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
_LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _code_spans(text: str) -> set[str]:
    spans = set()
    for match in _CODE.finditer(text):
        content = match.group(2).replace("\n", " ")
        if len(content) > 2 and content.startswith(" ") and content.endswith(" "):
            content = content[1:-1]
        spans.add(content)
    return spans


def _without_code(text: str) -> str:
    return _CODE.sub("", text)


def _anchors(markdown: Path) -> set[str]:
    """Heading anchors the way GitHub makes them (lower case, punctuation dropped)."""
    seen: Tally[str] = Tally()
    anchors = set()
    text = markdown.read_text(encoding="utf-8")
    # Lines inside fenced blocks are not headings.
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    for match in _HEADING.finditer(text):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchors.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return anchors


def config_field_names() -> list[str]:
    """Every field of the published schema as the reference writes it: `section.field`,
    or `field` at the top."""
    schema = json.loads(CONFIG_SCHEMA.read_text(encoding="utf-8"))
    return sorted(
        field if section == "" else f"{section}.{field}"
        for section, fields in field_paths(schema).items()
        for field in fields
    )


def documented_config_fields() -> list[str]:
    """The fields the config reference has a section for (`### `path``)."""
    text = CONFIG_REFERENCE.read_text(encoding="utf-8")
    return sorted(re.findall(r"^### `([^`]+)`$", text, flags=re.MULTILINE))


def exposed_metric_names() -> list[str]:
    """Every metric of `extproc.metrics` under the name Prometheus scrapes."""
    names = []
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names.append(f"{value._name}_total")
        elif isinstance(value, Gauge | Histogram | Summary):
            names.append(value._name)
    return sorted(names)


def markdown_files() -> list[Path]:
    return [*sorted(DOCS.glob("*.md")), REPO / "README.md"]


def test_the_checks_see_real_input() -> None:
    assert "tenants.<id>.keys[].hash" in config_field_names()
    assert "version" in config_field_names()
    assert "providers.<name>.forward_headers" in documented_config_fields()
    assert len(documented_config_fields()) > 80
    assert "asc_requests_total" in exposed_metric_names()
    assert "gen_ai_server_request_duration_seconds" in exposed_metric_names()
    # Double backticks hold single ones; a fenced block is one span, not several.
    assert _code_spans("a ``x `y` z`` and `b`\n```sh\nc `d`\n```") == {
        "x `y` z", "b", "sh c `d` "}


def test_every_config_field_is_documented() -> None:
    documented = _code_spans(CONFIG_REFERENCE.read_text(encoding="utf-8"))
    missing = [name for name in config_field_names() if name not in documented]
    assert missing == [], f"add these config fields to {CONFIG_REFERENCE.name}: {missing}"


def test_every_documented_config_field_exists() -> None:
    unknown = sorted(set(documented_config_fields()) - set(config_field_names()))
    assert unknown == [], f"{CONFIG_REFERENCE.name} documents fields the schema lacks"


def test_every_metric_is_documented() -> None:
    documented = _code_spans(OPERATOR_GUIDE.read_text(encoding="utf-8"))
    missing = [name for name in exposed_metric_names() if name not in documented]
    assert missing == [], f"add these metrics to {OPERATOR_GUIDE.name}: {missing}"


@pytest.mark.parametrize("markdown", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_existing_files(markdown: Path) -> None:
    broken = []
    for target in _LINK.findall(_without_code(markdown.read_text(encoding="utf-8"))):
        if _SCHEME.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        destination = (markdown.parent / path_part).resolve() if path_part else markdown
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
            broken.append(f"{target} (no such heading)")
    assert broken == []
