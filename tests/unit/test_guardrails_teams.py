"""A team's guardrails tighten its tenant's for the team's principals only."""

from __future__ import annotations

import json

from extproc.auth import hash_key
from extproc.config import parse_config
from extproc.messages import Respond
from extproc.phases import RequestProcessor
from extproc.runtime import Runtime
from extproc.secrets import Secret
from tests.unit.test_phases import (
    CONFIG,
    ENVIRON,
    PEPPER,
    FakeClock,
    chat,
    request_body,
    request_headers,
)

SUPPORT_KEY = "sk-team-support-key"
TEAM_CONFIG = CONFIG.replace(
    "  euco:\n",
    f"""  acme-teams:
    keys:
      - {{id: support-1, hash: "{hash_key(Secret(PEPPER), SUPPORT_KEY)}", team: support}}
    models: [gpt-4o-mini]
    guardrails: {{pii: {{email: redact}}}}
    teams:
      support:
        guardrails: {{pii: {{email: deny}}}}
      research: {{}}
  euco:
""", 1)


def _runtime() -> Runtime:
    return Runtime.build(parse_config(TEAM_CONFIG), environ=ENVIRON)


async def test_a_teams_guardrail_denies_what_its_tenant_redacts() -> None:
    processor = RequestProcessor(_runtime(), clock=FakeClock())
    await processor.handle(request_headers(None, authorization=f"Bearer {SUPPORT_KEY}"))
    body = chat(messages=[{"role": "user", "content": "mail me at jo@example.com"}])
    reply = await processor.handle(request_body(body))
    assert isinstance(reply, Respond)
    assert reply.status == 403
    error = json.loads(reply.body)["error"]
    assert error["code"] == "guardrail_denied"
    assert "pii.email" in error["message"]
    assert "jo@example.com" not in error["message"]
    assert processor.guardrail_actions == [("pii.email", "deny", 1)]
