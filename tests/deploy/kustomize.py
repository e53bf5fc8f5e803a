"""Render deploy/k8s with kustomize and validate what comes out.

The renderer is `kubectl kustomize` (the Makefile installs kubectl when it is missing:
docs/decisions/0095-kustomize-from-kubectl.md). Kubernetes objects are checked by
`kubernetes-validate` in strict mode (unknown fields fail) against one pinned Kubernetes
version; Istio objects by tests/deploy/istio_schema.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

import kubernetes_validate
import yaml

from tests.deploy.istio_schema import check as check_istio

__all__ = ["K8S", "KUBERNETES_VERSION", "kustomize", "problems"]

K8S: Final = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION: Final = "1.33.0"
"""The oldest Kubernetes minor still supported upstream that kubernetes-validate ships."""


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl is missing: `make test` installs it (make kubectl)"
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def problems(document: dict[str, Any]) -> list[str]:
    """[] when the object is valid for its schema (Kubernetes or Istio), else why not."""
    if document["apiVersion"].startswith("networking.istio.io/"):
        return check_istio(document)
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{document['kind']}/{document['metadata']['name']}: {exc.message} "
                f"at {'.'.join(str(part) for part in exc.path)}"]
    return []
