"""Issue 16, "Done when": every command block in docs/ is either executed by a test or
marked as illustrative.

One walk over every fenced block of docs/*.md, docs/decisions/*.md and README.md. Each
block needs a marker (tests/docs/markdown.py describes them) whose target is real:

* `tested by tests/docs/test_x.py` -- that test file exists and names the doc (a test
  that never reads the doc cannot be running its blocks);
* `example: docs/examples/X.yaml` / `fragment of docs/examples/X.yaml` -- that config
  exists (tests/docs/test_yaml_examples.py checks the content and runs check-config);
* `illustrative` -- for outputs, shapes with placeholders and commands that cannot run
  on this machine.

Every failure names the block as file:line, so the fix is one comment away.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.markdown import REPO, Block, blocks

DOCS = sorted([*REPO.glob("docs/*.md"), *REPO.glob("docs/decisions/*.md"),
               REPO / "README.md"])


def problems(block: Block, doc: str) -> list[str]:
    """What is wrong with this block's marker ([] when nothing), each naming file:line."""
    where = f"{doc}:{block.line}"
    marker = block.marker
    if marker is None:
        return [f"{where}: unmarked {block.lang or 'plain'} block; put `<!-- tested by "
                "tests/docs/test_x.py -->`, `<!-- illustrative -->`, `<!-- example: ... -->` "
                "or `<!-- fragment of ... -->` on the line before it"]
    if marker.kind == "illustrative":
        return []
    target = REPO / marker.target
    if not marker.target or not target.is_file():
        return [f"{where}: {marker.kind} target {marker.target!r} does not exist"]
    if marker.kind == "tested":
        if target.parent != REPO / "tests" / "docs" or target.suffix != ".py":
            return [f"{where}: {marker.target} is not a test under tests/docs/"]
        if doc not in target.read_text(encoding="utf-8"):
            return [f"{where}: {marker.target} never mentions {doc}, so it cannot be "
                    "running this block"]
        return []
    if target.parent != REPO / "docs" / "examples":
        return [f"{where}: {marker.target} is not a config under docs/examples/"]
    return []


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.relative_to(REPO).as_posix())
def test_every_block_is_tested_illustrative_or_an_example(doc: Path) -> None:
    name = doc.relative_to(REPO).as_posix()
    found = [problem for block in blocks(doc) for problem in problems(block, name)]
    assert found == [], "\n".join(found)


def test_the_walk_sees_the_docs_and_catches_each_kind_of_mistake(tmp_path: Path) -> None:
    """Guards the checker itself: it reads every doc, and each bad marker is reported."""
    assert {REPO / "README.md", REPO / "docs/quickstart.md",
            REPO / "docs/decisions/0070-local-keyring-path.md"} <= set(DOCS)
    assert sum(len(blocks(doc)) for doc in DOCS) >= 100
    page = tmp_path / "page.md"
    page.write_text(
        "```sh\nmake run\n```\n\n"
        "<!-- tested by tests/docs/test_no_such_test.py -->\n```sh\nmake run\n```\n"
        "<!-- tested by tests/docs/test_devstack.py -->\n```sh\nmake run\n```\n"
        "<!-- fragment of docs/examples/nope.yaml -->\n```yaml\na: 1\n```\n"
        "<!-- example: docs/examples/full.yaml -->\n\n```yaml\na: 1\n```\n"
        "<!-- illustrative -->\n```text\nout\n```\n"
        "<!-- illustrative -->\nprose in between\n```text\nout\n```\n", encoding="utf-8")
    found = [problem.split(":", 2)[1] + ":" + problem.split(":", 2)[2].split(";")[0]
             for block in blocks(page) for problem in problems(block, "docs/page.md")]
    assert found == [
        "1: unmarked sh block",
        "6: tested target 'tests/docs/test_no_such_test.py' does not exist",
        "10: tests/docs/test_devstack.py never mentions docs/page.md, so it cannot be "
        "running this block",
        "14: fragment target 'docs/examples/nope.yaml' does not exist",
        "28: unmarked text block",
    ]
