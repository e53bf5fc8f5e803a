"""deploy/k8s: every overlay renders with kustomize, every object passes its schema, and
the pod has the shape the docs promise (shared socket, probes, hardening, policy)."""

from __future__ import annotations

import copy
import functools
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import load_config
from extproc.devstack import HEADER_LOGGING_COMPONENTS
from extproc.envoy_bootstrap import EXTPROC_CLUSTER
from tests.deploy.envoyfilter import ISTIO, documents
from tests.deploy.golden import assert_rendered
from tests.deploy.kustomize import K8S, kustomize, problems
from tests.integration.test_render_shapes import regenerate_command

OVERLAYS = ["standalone", "istio-sidecar", "vault-agent"]
SOCKET = "/run/asc/extproc.sock"
ADMIN_SOCKET = "/run/asc/envoy-admin.sock"
HEALTH_PROBE = ["python", "-m", "extproc.health_probe", "--socket", SOCKET]


@functools.cache
def _rendered(overlay: str) -> list[dict[str, Any]]:
    return kustomize(K8S / "overlays" / overlay)


def _render(overlay: str) -> list[dict[str, Any]]:
    """One kustomize run per overlay and session; each test gets its own copy."""
    return copy.deepcopy(_rendered(overlay))


def _one(documents_: list[dict[str, Any]], kind: str, name: str = "asc-gateway") -> Any:
    (found,) = [doc for doc in documents_
                if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def _containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_is_valid(overlay: str) -> None:
    rendered = _render(overlay)
    kinds = sorted(doc["kind"] for doc in rendered)
    assert {"ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
            "PodDisruptionBudget", "ServiceAccount"} <= set(kinds)
    assert {doc["metadata"].get("namespace") for doc in rendered} == {"asc"}
    assert [problem for doc in rendered for problem in problems(doc)] == []


def test_validation_rejects_a_misspelt_field() -> None:
    deployment = _one(_render("standalone"), "Deployment")
    broken = copy.deepcopy(deployment)
    _containers(broken)["extproc"]["securityContext"]["readOnlyRootFileSystem"] = True
    (problem,) = problems(broken)
    assert "'readOnlyRootFileSystem' was unexpected" in problem


def test_standalone_pod_shares_the_socket_between_envoy_and_extproc() -> None:
    rendered = _render("standalone")
    deployment = _one(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    containers = _containers(deployment)
    assert sorted(containers) == ["envoy", "extproc"]
    socket_volume = {volume["name"]: volume for volume in pod["volumes"]}["asc-socket"]
    assert socket_volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Mi"}
    for container in containers.values():
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        assert mounts["asc-socket"] == "/run/asc"
    args = containers["extproc"]["args"]
    assert args[args.index("--listen") + 1] == f"unix:{SOCKET}"
    # Envoy at debug would print header maps (keys): those components stay at info (0130).
    envoy_args = containers["envoy"]["args"]
    assert envoy_args[envoy_args.index("--component-log-level") + 1] == ",".join(
        f"{name}:info" for name in HEADER_LOGGING_COMPONENTS)
    # The pepper and the Transit token: files of the Secret, where asc.yaml reads them.
    secrets = {volume["name"]: volume for volume in pod["volumes"]}["asc-secrets"]
    assert secrets["secret"] == {"secretName": "asc-secrets", "defaultMode": 0o444}
    extproc_mounts = {m["name"]: m["mountPath"] for m in containers["extproc"]["volumeMounts"]}
    assert extproc_mounts["asc-secrets"] == "/etc/asc/secrets"
    assert "asc-secrets" not in {m["name"] for m in containers["envoy"]["volumeMounts"]}
    config = load_config(K8S / "base" / "asc.yaml")
    assert str(config.pepper.file) == "/etc/asc/secrets/pepper"
    # The Envoy bootstrap in the ConfigMap points at that socket, admin beside it.
    config_map = next(doc for doc in rendered if doc["kind"] == "ConfigMap"
                      and doc["metadata"]["name"].startswith("asc-envoy-"))
    bootstrap = yaml.safe_load(config_map["data"]["envoy.yaml"])
    assert bootstrap["admin"]["address"] == {"pipe": {"path": ADMIN_SOCKET, "mode": 0o600}}
    (extproc_cluster,) = [cluster for cluster in bootstrap["static_resources"]["clusters"]
                          if cluster["name"] == EXTPROC_CLUSTER]
    (endpoint,) = extproc_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"] == {"pipe": {"path": SOCKET}}
    service = _one(rendered, "Service")
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http",
                                         "protocol": "TCP", "appProtocol": "http"}]
    assert containers["envoy"]["ports"][0]["containerPort"] == (
        bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"][
            "port_value"])


def test_envoy_bootstrap_is_the_rendered_sidecar_shape(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`extproc envoy render --shape sidecar` for the base asc.yaml, accepted by Envoy."""
    path = K8S / "overlays" / "standalone" / "envoy.yaml"
    assert regenerate_command(path)[4:] == ["--config", "deploy/k8s/base/asc.yaml"]
    assert_rendered(path, tmp_path, monkeypatch)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_is_hardened_probed_and_scraped(overlay: str) -> None:
    deployment = _one(_render(overlay), "Deployment")
    template = deployment["spec"]["template"]
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert set(container["resources"]) == {"requests", "limits"}, container["name"]
    extproc = _containers(deployment)["extproc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert extproc[probe]["exec"]["command"] == HEALTH_PROBE
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "9464"
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in extproc["ports"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1,
                                                               "maxUnavailable": 0}
    # extproc outlives the proxy's 15 s drain, then drains 20 s, inside the grace period.
    assert extproc["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "15"]
    args = extproc["args"]
    assert args[args.index("--drain-seconds") + 1] == "20"
    assert pod["terminationGracePeriodSeconds"] == 45


def _policy_ports(rendered: list[dict[str, Any]], direction: str) -> set[int]:
    return {port["port"] for doc in rendered if doc["kind"] == "NetworkPolicy"
            for rule in doc["spec"].get(direction, []) for port in rule.get("ports", [])}


def test_network_policy_allows_only_what_is_needed() -> None:
    rendered = _render("standalone")
    assert _policy_ports(rendered, "ingress") == {10000, 9464}
    assert _policy_ports(rendered, "egress") == {53, 6379, 8200, 443}
    base = _one(rendered, "NetworkPolicy")
    assert base["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (public,) = [rule for rule in base["spec"]["egress"]
                 if rule["to"][0].get("ipBlock")]
    assert public["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert "10.0.0.0/8" in public["to"][0]["ipBlock"]["except"]
    istio = _render("istio-sidecar")
    assert _policy_ports(istio, "egress") == {53, 6379, 8200, 443, 15012}


def test_pdb_and_hpa_target_the_gateway() -> None:
    rendered = _render("standalone")
    deployment = _one(rendered, "Deployment")
    pdb = _one(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    hpa = _one(rendered, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "asc-gateway"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)


def test_istio_sidecar_overlay_joins_the_envoy_filter() -> None:
    rendered = _render("istio-sidecar")
    deployment = _one(rendered, "Deployment")
    template = deployment["spec"]["template"]
    envoy_filter = _one(rendered, "EnvoyFilter", "asc-extproc-sidecar")
    selector = envoy_filter["spec"]["workloadSelector"]["labels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert template["metadata"]["labels"]["sidecar.istio.io/inject"] == "true"
    mount = yaml.safe_load(template["metadata"]["annotations"][
        "sidecar.istio.io/userVolumeMount"])
    assert mount == [{"name": "asc-socket", "mountPath": "/run/asc"}]
    containers = _containers(deployment)
    assert sorted(containers) == ["app", "extproc"]  # Istio injects the proxy
    # istio-proxy opens the 0660 socket as a member of the pod's fsGroup, the service's
    # group; extproc keeps its uid (1337 would bypass the sidecar for its own calls).
    assert "runAsUser" not in containers["extproc"]["securityContext"]
    assert template["spec"]["securityContext"]["runAsUser"] == 10001
    assert template["spec"]["securityContext"]["fsGroup"] == 10001
    assert {doc["kind"] for doc in rendered} >= {"ServiceEntry", "DestinationRule"}


def test_vault_agent_overlay_reads_secrets_from_the_agent() -> None:
    rendered = _render("vault-agent")
    deployment = _one(rendered, "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["vault.hashicorp.com/agent-inject"] == "true"
    assert annotations["vault.hashicorp.com/agent-inject-token"] == "true"
    assert annotations["vault.hashicorp.com/agent-run-as-user"] == "10001"
    pod = deployment["spec"]["template"]["spec"]
    assert "asc-secrets" not in {volume["name"] for volume in pod["volumes"]}
    assert "/etc/asc/secrets" not in {mount["mountPath"] for mount in
                                      _containers(deployment)["extproc"]["volumeMounts"]}
    config_map = next(doc for doc in rendered if doc["kind"] == "ConfigMap"
                      and doc["metadata"]["name"].startswith("asc-config-"))
    config = yaml.safe_load(config_map["data"]["asc.yaml"])
    base = yaml.safe_load((K8S / "base" / "asc.yaml").read_text(encoding="utf-8"))
    assert config["auth"]["pepper"] == {"file": "/vault/secrets/pepper"}
    assert config["secrets"]["kek"]["token"] == {"file": "/vault/secrets/token"}
    base["auth"]["pepper"] = config["auth"]["pepper"]
    base["secrets"]["kek"]["token"] = config["secrets"]["kek"]["token"]
    assert config == base
    load_config(K8S / "overlays" / "vault-agent" / "asc.yaml")


@pytest.mark.parametrize("patch", [ISTIO / "sidecar" / "extproc-sidecar.patch.yaml",
                                   ISTIO / "gateway" / "ingressgateway-extproc.patch.yaml"],
                         ids=["sidecar", "ingressgateway"])
def test_deployment_patches_apply_to_a_deployment(patch: Path, tmp_path: Path) -> None:
    """What docs/istio.md tells an operator to do with the patch files works: kustomize
    merges them into a Deployment of that name and the result is a valid Deployment."""
    (document,) = documents(patch)
    name, namespace = document["metadata"]["name"], document["metadata"].get("namespace")
    target = {"apiVersion": "apps/v1", "kind": "Deployment",
              "metadata": {"name": name, **({"namespace": namespace} if namespace else {})},
              "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
                  "metadata": {"labels": {"app": name}},
                  "spec": {"containers": [
                      {"name": "istio-proxy" if "gateway" in name else "app",
                       "image": "example/app:1"}]}}}}
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(target), encoding="utf-8")
    shutil.copy(patch, tmp_path / "patch.yaml")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [deployment.yaml]\npatchesStrategicMerge: [patch.yaml]\n",
        encoding="utf-8")
    (merged,) = kustomize(tmp_path)
    assert problems(merged) == []
    containers = _containers(merged)
    assert containers["extproc"]["readinessProbe"]["exec"]["command"] == HEALTH_PROBE
    assert containers["extproc"]["securityContext"]["runAsUser"] == 10001
    assert containers["extproc"]["securityContext"]["runAsGroup"] == 10001
    assert merged["spec"]["template"]["spec"]["securityContext"] == {
        "supplementalGroups": [10001]}
    volumes = {volume["name"] for volume in merged["spec"]["template"]["spec"]["volumes"]}
    assert {"asc-socket", "asc-config", "asc-secrets", "asc-tmp"} <= volumes
    if "gateway" in name:
        assert containers["istio-proxy"]["image"] == "example/app:1"
        assert containers["istio-proxy"]["volumeMounts"] == [
            {"name": "asc-socket", "mountPath": "/run/asc"}]
