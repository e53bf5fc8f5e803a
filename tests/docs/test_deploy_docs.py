"""docs/kubernetes.md and docs/istio.md: their command blocks, run as written.

Each block marked `tested by tests/docs/test_deploy_docs.py` runs in bash (`-euo
pipefail`) in an empty directory that sees the repository's `deploy/`, with no cluster
(KUBECONFIG points nowhere: these commands must work offline). What a block prints and
every YAML file it writes must be Kubernetes or Istio objects that pass their schemas
(tests/deploy/kustomize.py); the Secret block must give the two keys the pods read.
"""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.kustomize import problems
from tests.docs.markdown import REPO, Block, blocks

DOCS = ("docs/kubernetes.md", "docs/istio.md")
THIS = "tests/docs/test_deploy_docs.py"
BLOCKS = [block for doc in DOCS for block in blocks(REPO / doc)
          if block.marker is not None and block.marker.target == THIS]


def _run(block: Block, workdir: Path) -> tuple[str, dict[str, list[dict[str, object]]]]:
    (workdir / "deploy").symlink_to(REPO / "deploy")
    env = dict(os.environ, KUBECONFIG=str(workdir / "no-kubeconfig"),
               BAO_TOKEN="hvs.example-token-for-the-docs-test")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=workdir,
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{block.where}: {result.stderr}"
    written = {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
               for path in workdir.glob("*.yaml")}
    return result.stdout, written


def test_the_docs_have_their_command_blocks() -> None:
    assert sorted(block.text for block in BLOCKS if block.text.startswith("kubectl kustomize")) == [
        "kubectl kustomize deploy/istio/gateway\n",
        "kubectl kustomize deploy/k8s/overlays/istio-sidecar\n",
        "kubectl kustomize deploy/k8s/overlays/standalone\n",
        "kubectl kustomize deploy/k8s/overlays/vault-agent\n",
    ]
    assert len(BLOCKS) == 5


@pytest.mark.parametrize("block", BLOCKS, ids=[block.where for block in BLOCKS])
def test_block_runs_and_gives_valid_objects(block: Block, tmp_path: Path) -> None:
    stdout, written = _run(block, tmp_path)
    objects = [doc for doc in yaml.safe_load_all(stdout) if doc]
    objects += [doc for docs in written.values() for doc in docs]
    assert objects, f"{block.where} produced no object"
    assert [problem for doc in objects for problem in problems(doc)] == []


def test_secret_block_gives_the_keys_the_pod_reads(tmp_path: Path) -> None:
    (block,) = [block for block in BLOCKS if "create secret" in block.text]
    _, written = _run(block, tmp_path)
    (secret,) = written["asc-secrets.yaml"]
    assert secret["metadata"] == {"name": "asc-secrets", "namespace": "asc",
                                  "creationTimestamp": None}
    data = {key: base64.b64decode(value) for key, value in secret["data"].items()}
    assert sorted(data) == ["pepper", "transit-token"]
    assert data["transit-token"] == b"hvs.example-token-for-the-docs-test"
    # 32 random bytes in base64, without the newline that would change every key hash.
    assert len(data["pepper"]) == 44
    assert not data["pepper"].endswith(b"\n")
    assert data["pepper"] == (tmp_path / "pepper.txt").read_bytes()
