"""docs/quickstart.md, run as written against a real local stack (issue 16, "Done when").

One `make run` (the dev stack: redis-server, the emulator, extproc, Envoy) for the whole
module, started the way §1 says, in a throw-away checkout whose ports are free ones
(tests/docs/ops_harness.py). Each `curl` block runs as written -- only `host:port`
changes -- and its output is compared with the block the doc shows under it: exact
status, headers and JSON bodies; only ids, timestamps, timings and lengths may differ,
and `...` in the doc stands for an elided part (a line, or a run of lines). Error cases
the doc describes in prose ("the same at the Anthropic door") are sent as described.
§6's commands run with `/etc/asc` moved to a temporary directory.

A few blocks of docs/operator-guide.md need the same running stack (the gRPC health
check, the emulator and its fault API), so they are run here too, and so is the curl of
README.md.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from extproc.devstack import free_port
from tests.docs.markdown import REPO, Block, blocks
from tests.docs.ops_harness import Checkout, RunningStack, commands
from tests.polling import wait_for

QUICKSTART = REPO / "docs/quickstart.md"
OPERATOR_GUIDE = REPO / "docs/operator-guide.md"
BLOCKS = blocks(QUICKSTART)

_VARIABLE: tuple[tuple[str, str], ...] = (
    (r"^\.\.\.\n", r"(?:.*\n)*?"),  # a line `...`: a run of lines left out
    (r"\.\.\.", r".*?"),  # `...` in a line: part of the line left out
    (r"chatcmpl-emu-\d+", r"chatcmpl-emu-\d+"),
    (r'"created":\d+', r'"created":\d+'),
    (r"(?<=x-asc-request-id: )[0-9a-f]{32}", r"[0-9a-f]{32}"),
    (r"(?<=x-envoy-upstream-service-time: )\d+", r"\d+"),
    (r"(?<=content-length: )\d+", r"\d+"),
    (r"(?<=date: )\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT",
     r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT"),
    (r"/tmp/asc-[a-z0-9_]+/", r"/tmp/asc-[a-z0-9_]+/"),
)
_TOKENS = re.compile("|".join(f"({doc})" for doc, _ in _VARIABLE), re.MULTILINE)


def as_pattern(shown: str) -> re.Pattern[str]:
    """The output a doc block shows, as a pattern: literal except ids, timestamps,
    timings, lengths and `...`."""
    parts: list[str] = []
    position = 0
    for match in _TOKENS.finditer(shown):
        assert match.lastindex is not None
        parts += [re.escape(shown[position:match.start()]), _VARIABLE[match.lastindex - 1][1]]
        position = match.end()
    parts.append(re.escape(shown[position:]))
    return re.compile("".join(parts))


def assert_shown(real: str, block: Block) -> None:
    """`real` output is what `block` shows (trailing newlines aside: a body has none)."""
    real = real.replace("\r\n", "\n").rstrip("\n") + "\n"
    assert as_pattern(block.text.rstrip("\n") + "\n").fullmatch(real), (
        f"{block.where} shows:\n{block.text}\nbut the stack answered:\n{real}")
    head, _, body = real.partition("\n\n")
    lengths = re.findall(r"^content-length: (\d+)$", head, re.MULTILINE)
    assert lengths in ([], [str(len(body.rstrip("\n").encode()))]), real


def block_at(index: int, lang: str, starts: str) -> Block:
    """Quickstart block number `index`, checked to be the one the test means."""
    block = BLOCKS[index]
    assert (block.lang, block.text[:len(starts)]) == (lang, starts), block.where
    assert block.marker is not None
    assert block.marker.target == "tests/docs/test_quickstart.py"
    return block


def command(block: Block) -> str:
    [line] = commands(block.text)
    return line


@dataclass
class Quickstart:
    checkout: Checkout
    stack: RunningStack

    def run(self, line: str) -> str:
        return self.checkout.run(line).stdout


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Quickstart]:
    checkout = Checkout(tmp_path_factory.mktemp("quickstart") / "checkout")
    assert command(block_at(0, "sh", "make run")) == "make run"
    stack = checkout.start("make run")
    try:
        yield Quickstart(checkout, stack)
    finally:
        stack.stop()


def test_1_make_run_prints_the_stack_as_shown(quickstart: Quickstart) -> None:
    checkout = quickstart.checkout
    shown = block_at(1, "text", "asc-extproc stack is up").text
    for doc, real in (("/work/main", str(checkout.root)),
                      (":10000", f":{checkout.listen_port}"),
                      (":50051", f":{checkout.extproc_port}"),
                      (":9464", f":{checkout.metrics_port}"),
                      (":18080", f":{checkout.emulator_port}"),
                      ("16379", str(checkout.redis_port))):
        shown = shown.replace(doc, real)
    printed = quickstart.stack.output[0]
    printed = printed[printed.index("asc-extproc stack is up"):]
    assert as_pattern(shown).fullmatch(printed), f"shown:\n{shown}\nprinted:\n{printed}"
    # The printed curl works as printed.
    curl = printed[printed.index("  curl"):printed.index("\n\nCtrl-C")]
    answer = quickstart.run(curl)
    assert '"content":"Hello from the emulator."' in answer, answer
    assert sorted(path.name for path in (checkout.root / "var/run").glob("*.log")) == sorted(
        ["envoy.log", "extproc.log", f"emulator-{checkout.emulator_port}.log",
         f"redis-{checkout.redis_port}.log"])
    assert (checkout.root / "var/run/envoy.yaml").is_file()
    # The audit record of that curl, in var/run/audit, under a generated 0600 signing key
    # (docs/audit.md).
    audit = checkout.root / "var/run/audit"
    assert wait_for(lambda: any('"type":"record"' in path.read_text(encoding="utf-8")
                                for path in audit.glob("audit-*.jsonl")))
    assert (audit / "signing.key").stat().st_mode & 0o777 == 0o600
    assert (audit / "audit.pub").read_text(encoding="ascii").startswith(
        "-----BEGIN PUBLIC KEY-----")


def test_readme_curl_is_the_printed_one_and_answers_as_described(
        quickstart: Quickstart) -> None:
    [block] = [block for block in blocks(REPO / "README.md", "sh")
               if block.text.startswith("curl ")]
    printed = quickstart.stack.output[0]
    printed = printed[printed.index("  curl"):printed.index("\n\nCtrl-C")]
    port = f"127.0.0.1:{quickstart.checkout.listen_port}"
    assert block.text == printed.replace("\n  ", "\n").lstrip().replace(
        port, "127.0.0.1:10000") + "\n"
    answer = quickstart.run(block.text.replace("curl -s ", "curl -si ", 1))
    head, _, body = answer.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200 OK\n"), answer
    # "carries x-asc-request-id, x-asc-provider, x-asc-region and x-asc-credential"
    assert re.search(r"^x-asc-request-id: [0-9a-f]{32}$", head, re.MULTILINE), head
    assert "\nx-asc-provider: emu-eu\nx-asc-region: eu-west-1\n" in head, head
    assert "\nx-asc-credential: emu-eu-1@1\n" in head, head
    assert '"content":"Hello from the emulator."' in body, body


def test_2_a_successful_request(quickstart: Quickstart) -> None:
    curl = command(block_at(4, "sh", "curl -si http://127.0.0.1:10000/v1/chat/"))
    assert_shown(quickstart.run(curl), block_at(5, "text", "HTTP/1.1 200 OK"))


def test_2_globex_lands_on_emu_us_with_the_model_name_unchanged(quickstart: Quickstart) -> None:
    curl = command(block_at(6, "sh", "curl -s http://127.0.0.1:10000/v1/chat/"))
    assert "x-api-key: sk-asc-demo-globex-key" in curl
    answer = quickstart.run(curl.replace("curl -s ", "curl -si ", 1)).replace("\r\n", "\n")
    head, _, body = answer.partition("\n\n")
    assert head.startswith("HTTP/1.1 200 OK\n"), answer
    assert "\nx-asc-provider: emu-us\nx-asc-region: us-east-1\n" in head, head
    assert '"model":"gpt-4o",' in body, body


def test_2_the_anthropic_front_door(quickstart: Quickstart) -> None:
    curl = command(block_at(7, "sh", "curl -si http://127.0.0.1:10000/v1/messages"))
    assert_shown(quickstart.run(curl), block_at(8, "text", "HTTP/1.1 200 OK"))


def _error_cases() -> list[tuple[int, str]]:
    """(index of the shown output, the request the doc describes), §3 in order."""
    [wrong_key] = [command(BLOCKS[9])]
    not_allowed = command(BLOCKS[14])
    anthropic = (wrong_key.replace("/v1/chat/completions", "/v1/messages")
                 .replace("-H 'Authorization: Bearer sk-wrong'", "-H 'x-api-key: sk-wrong'")
                 .replace('"model": "gpt-4o-mini", ',
                          '"model": "gpt-4o-mini", "max_tokens": 10, '))
    no_max_tokens = (not_allowed.replace("/v1/chat/completions", "/v1/messages")
                     .replace("-H 'Authorization: Bearer sk-asc-demo-acme-key'",
                              "-H 'x-api-key: sk-asc-demo-acme-key'")
                     .replace('"gpt-4o"', '"gpt-4o-mini"'))
    return [
        (10, wrong_key),
        (11, anthropic),
        (12, wrong_key.replace("-H 'Authorization: Bearer sk-wrong' ", "")),
        (13, not_allowed.replace('"gpt-4o"', '"gpt-5"')),
        (15, not_allowed),
        (16, no_max_tokens),
        (17, "curl -s -w ' %{http_code}\\n' http://127.0.0.1:10000/v1/files "
             "-H 'Authorization: Bearer sk-asc-demo-acme-key'"),
    ]


@pytest.mark.parametrize(("shown", "curl"), _error_cases(),
                         ids=[BLOCKS[shown].where for shown, _ in _error_cases()])
def test_3_error_cases(quickstart: Quickstart, shown: int, curl: str) -> None:
    block_at(shown, "text", "{")
    assert curl.startswith("curl -s -w ' %{http_code}\\n' http://127.0.0.1:10000/"), curl
    assert quickstart.run(curl) == BLOCKS[shown].text


def with_emulator(block: Block, quickstart: Quickstart) -> str:
    """A block that queues a fault first: the emulator's address is this stack's."""
    assert "http://127.0.0.1:18080/_emulator/faults" in block.text
    return block.text.replace(":18080", f":{quickstart.checkout.emulator_port}")


def test_3_a_provider_500_is_a_502(quickstart: Quickstart) -> None:
    both = with_emulator(block_at(18, "sh", "curl -s -o /dev/null -X POST"), quickstart)
    assert quickstart.run(both) == block_at(19, "text", '{"error"').text


def test_3_a_provider_429_at_the_anthropic_door(quickstart: Quickstart) -> None:
    both = with_emulator(block_at(20, "sh", "curl -s -o /dev/null -X POST"), quickstart)
    assert_shown(quickstart.run(both), block_at(21, "text", "HTTP/1.1 429 Too Many Requests"))


def test_4_streaming_at_the_openai_door(quickstart: Quickstart) -> None:
    curl = command(block_at(22, "sh", "curl -sN http://127.0.0.1:10000/v1/chat/"))
    real = quickstart.run(curl)
    assert_shown(real, block_at(23, "text", "data: {"))
    assert '"choices":[]' not in real  # the usage-only chunk the client did not ask for


def test_4_streaming_at_the_anthropic_door(quickstart: Quickstart) -> None:
    """Shown without its command: the §2 Anthropic request with `"stream": true`."""
    curl = command(BLOCKS[7]).replace("curl -si ", "curl -sN ", 1).replace(
        '"max_tokens": 256, ', '"max_tokens": 256, "stream": true, ')
    assert_shown(quickstart.run(curl), block_at(24, "text", "event: message_start"))


@pytest.fixture(scope="module")
def etc_asc(quickstart: Quickstart, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """§6 step 1 as written, with /etc/asc in a temporary directory; then the operator's
    config: a copy of the demo config that names that pepper file."""
    etc = tmp_path_factory.mktemp("etc") / "asc"
    block = block_at(27, "sh", "mkdir -p /etc/asc")
    quickstart.checkout.run(block.text.replace("/etc/asc", str(etc)))
    pepper = etc / "pepper.txt"
    assert stat.S_IMODE(pepper.stat().st_mode) == 0o600
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\n", pepper.read_text(encoding="utf-8"))
    config = yaml.safe_load((quickstart.checkout.root / "deploy/demo/asc.yaml").read_text(
        encoding="utf-8"))
    config["auth"]["pepper"] = {"file": str(pepper)}
    (etc / "asc.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return etc


def doc_command(block: Block, etc: Path) -> tuple[str, str]:
    """(the command, the output its `# ...` comment lines show), /etc/asc moved."""
    text = block.text.replace("/etc/asc", str(etc))
    [line] = commands(text)
    shown = "".join(comment.removeprefix("# ") + "\n" for comment in text.splitlines()
                    if comment.startswith("# "))
    return line, shown


def test_6_virtual_keys(quickstart: Quickstart, etc_asc: Path) -> None:
    generate, _ = doc_command(block_at(28, "sh", ".venv/bin/extproc keys hash"), etc_asc)
    made = quickstart.run(generate)
    shape = block_at(29, "text", "key:  sk-asc-").text
    assert re.sub(r"sk-asc-[A-Za-z0-9_-]{43}", "KEY", re.sub(r"[0-9a-f]{64}", "HEX", made)) == (
        re.sub(r"sk-asc-[A-Za-z0-9_-]{43}", "KEY", re.sub(r"[0-9a-f]{64}", "HEX", shape)))
    key, digest = re.findall(r"^(?:key|hash): +(\S+)$", made, re.MULTILINE)
    piped, shown = doc_command(block_at(30, "sh", "echo sk-asc-demo-acme-key |"), etc_asc)
    assert quickstart.run(piped) == shown
    # The piped form hashes a key you already have exactly as --generate did.
    own = piped.replace("sk-asc-demo-acme-key", key).replace(
        "deploy/demo/asc.yaml", str(etc_asc / "asc.yaml"))
    assert quickstart.run(own) == digest + "\n"


def test_6_validate(quickstart: Quickstart, etc_asc: Path) -> None:
    check, shown = doc_command(block_at(31, "sh", ".venv/bin/extproc check-config"), etc_asc)
    assert quickstart.run(check) == shown
    session = block_at(32, "text", "$ extproc check-config broken.yaml").text
    typed, _, expected = session.partition("\n")
    done = subprocess.run(["bash", "-c", typed.removeprefix("$ ")],
                          cwd=REPO / "docs/examples/invalid", capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"},
                          timeout=60, check=False)
    assert (done.returncode, done.stdout + done.stderr) == (1, expected)


def test_6_render_the_envoy_bootstrap(quickstart: Quickstart, etc_asc: Path) -> None:
    block = block_at(33, "sh", ".venv/bin/extproc envoy render")
    to_file, to_head = commands(block.text.replace("/etc/asc", str(etc_asc)))
    quickstart.run(to_file)
    head = block_at(34, "text", "# Rendered by").text
    rendered = (quickstart.checkout.root / "envoy.yaml").read_text(encoding="utf-8")
    assert rendered.startswith(head.replace("deploy/demo/asc.yaml", f"{etc_asc}/asc.yaml"))
    assert quickstart.run(to_head) == head


def test_6_make_run_with_your_own_config(quickstart: Quickstart, etc_asc: Path) -> None:
    """Beside the module's stack: its own work directory and ports (§1's variables)."""
    line = command(block_at(35, "sh", "make run CONFIG=")).replace("/etc/asc", str(etc_asc))
    ports = {name: free_port() for name in ("LISTEN_PORT", "EXTPROC_PORT", "METRICS_PORT",
                                             "REDIS_PORT", "EMULATOR_PORT")}
    line += " WORKDIR=var/run-own " + " ".join(f"{k}={v}" for k, v in ports.items())
    own = quickstart.checkout.start(line)
    try:
        printed = own.output[0]
    finally:
        own.stop()
    assert f"  Envoy        http://127.0.0.1:{ports['LISTEN_PORT']}\n" in printed, printed
    assert "-H 'Authorization: Bearer <your-virtual-key>'" in printed, printed
    assert '"model": "gpt-4o-mini"' in printed, printed


def guide_block(starts: str) -> Block:
    [block] = [block for block in blocks(OPERATOR_GUIDE) if block.text.startswith(starts)]
    assert block.marker is not None
    assert block.marker.target == "tests/docs/test_quickstart.py"
    return block


def test_operator_guide_grpc_health_check(quickstart: Quickstart) -> None:
    snippet = guide_block("import grpc\n").text
    assert '"127.0.0.1:50051"' in snippet
    snippet = snippet.replace("127.0.0.1:50051", f"127.0.0.1:{quickstart.checkout.extproc_port}")
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, "1\n", "")


def test_operator_guide_emulator_command() -> None:
    line, shown = doc_command(guide_block("EMULATOR_KEYS=sk-emu-1,sk-emu-2 python"), Path())
    port = free_port()
    env = {**os.environ, "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}  # an active venv
    emulator = subprocess.Popen(["bash", "-c", line.replace("18080", str(port))],
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert emulator.stdout is not None
        assert emulator.stdout.readline() == shown.replace("18080", str(port))
    finally:
        os.killpg(emulator.pid, signal.SIGTERM)
        emulator.wait(10)


def test_operator_guide_emulator_fault_api(quickstart: Quickstart) -> None:
    """Last against the module's stack: it makes the provider fail twice."""
    line, _ = doc_command(guide_block("curl -s -X POST http://127.0.0.1:18080/_emulator"),
                          Path())
    quickstart.run(line.replace(":18080", f":{quickstart.checkout.emulator_port}"))
    curl = command(BLOCKS[14]).replace('"gpt-4o"', '"gpt-4o-mini"')
    seen = [quickstart.run(curl).rsplit(" ", 1)[1] for _ in range(3)]
    assert seen == ["502\n", "502\n", "200\n"]


def test_6_hot_reload(quickstart: Quickstart) -> None:
    """Step 8: the edit the doc describes, then its request until the reload is seen
    (bounded poll); then the edit undone, as the doc says, and the 200 back."""
    curl = command(block_at(36, "sh", "curl -s -w ' %{http_code}\\n' http://127.0.0.1:10000/"))
    shown = block_at(37, "text", '{"error"').text
    config = quickstart.checkout.root / "deploy/demo/asc.yaml"
    original = config.read_text(encoding="utf-8")
    line = "    models: [gpt-4o-mini, gpt-4o]\n"
    assert original.count(line) == 1, "the globex line the doc edits"
    assert quickstart.run(curl).endswith(" 200\n")
    config.write_text(original.replace(line, "    models: [gpt-4o-mini]\n"), encoding="utf-8")
    try:
        assert poll(quickstart, curl, shown) == shown
        log = (quickstart.checkout.root / "var/run/extproc.log").read_text(encoding="utf-8")
        assert re.search(r'"msg":"config reloaded".*"reason":"file changed"', log), log[-2000:]
    finally:
        config.write_text(original, encoding="utf-8")
    assert poll(quickstart, curl, " 200\n").endswith(" 200\n")


def poll(quickstart: Quickstart, curl: str, until: str, timeout: float = 15) -> str:
    """Run `curl` until its output ends with `until` (the watcher looks once a second),
    or the time is up; the last output."""
    deadline = time.monotonic() + timeout
    seen = quickstart.run(curl)
    while not seen.endswith(until) and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = quickstart.run(curl)
    return seen


def test_1_ctrl_c_stops_everything(quickstart: Quickstart) -> None:
    stack = quickstart.stack
    # The dev stack exits 0; make, which got the same Ctrl-C, re-raises it.
    assert stack.stop() == -signal.SIGINT
    assert stack.output[-1].splitlines()[-1:] == ["stopping..."], stack.output[-1]
    for port in (quickstart.checkout.listen_port, quickstart.checkout.extproc_port,
                 quickstart.checkout.emulator_port, quickstart.checkout.redis_port):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, port
