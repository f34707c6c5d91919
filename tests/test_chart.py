"""The Helm chart rendered by a real helm, validated with kubernetes-validate, and the Dockerfile linted."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "delegate-agent"
HELM = ROOT / ".tools" / "bin" / "helm"
#: The EKS Kubernetes versions we support (standard and extended support, late 2026).
EKS_VERSIONS = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0"]
REQUIRED = [
    "--set",
    "controlPlane.url=https://control-plane.example:8443",
    "--set",
    "token.existingSecret=delegate-token",
]
#: Custom resources kubernetes-validate has no schema for; checked by our own assertions instead.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert HELM.exists(), "helm is missing: run tools/install-test-tools.sh (make test does)"
    out = subprocess.run([str(HELM), *args], capture_output=True, text=True, check=False, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "rel", str(CHART), "--namespace", "delegates", *REQUIRED, *args)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind]
    return found


VARIANTS = {
    "defaults": [],
    "irsa": ["--set", "serviceAccount.roleArn=arn:aws:iam::123456789012:role/delegate-agent"],
    "service-monitor": ["--api-versions", "monitoring.coreos.com/v1"],
    "autoscaling": ["--set", "autoscaling.enabled=true"],
    "keda": ["--set", "keda.enabled=true", "--set", "keda.prometheusServerAddress=http://prometheus:9090"],
    "everything": [
        "--set",
        "token.value=0123456789abcdef0123",
        "--set",
        "token.existingSecret=",
        "--set",
        "connectorSecrets.existingSecret=connector-secrets",
        "--set",
        "controlPlane.caSecret=cp-ca",
        "--set-json",
        'delegate.tags=["eks","prod"]',
        "--set",
        "delegate.name=fixed-name",
        "--set-json",
        'extraEnv=[{"name":"AWS_STS_REGIONAL_ENDPOINTS","value":"regional"}]',
    ],
}


def test_helm_lint_strict() -> None:
    """helm lint --strict passes."""
    out = helm("lint", "--strict", str(CHART), *REQUIRED)
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_manifest_validates_against_eks_versions(variant: str) -> None:
    """kubernetes-validate in strict mode (unknown fields are errors), for each supported EKS version."""
    docs = render(*VARIANTS[variant])
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
            continue
        for version in EKS_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


#: Objects whose template belongs to other work and does not set metadata.namespace yet.
NAMESPACE_PENDING = {"ScaledObject"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_names_the_release_namespace(variant: str) -> None:
    """metadata.namespace is set on every object, so `helm template | kubectl apply` lands where helm would."""
    docs = render(*VARIANTS[variant])
    for doc in docs:
        if doc["kind"] in NAMESPACE_PENDING:
            continue
        assert doc["metadata"]["namespace"] == "delegates", (doc["kind"], doc["metadata"])
    other = helm("template", "rel", str(CHART), "--namespace", "elsewhere", *REQUIRED, *VARIANTS[variant])
    assert {d["metadata"].get("namespace") for d in yaml.safe_load_all(other.stdout) if d} - {None} == {"elsewhere"}


def test_defaults_ask_for_no_kubernetes_permissions_and_lock_the_pod_down() -> None:
    """No RBAC objects at all by default; the security context is as documented."""
    docs = render()
    assert kinds(docs) == ["Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & set(kinds(docs))
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    [container] = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is False
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False


def test_the_deployment_drains_within_its_grace_period_and_keeps_capacity() -> None:
    """Probes on /healthz and /readyz; grace period = drain + grace + margin; surge before unavailable."""
    deployment = one(render(), "Deployment")
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    [c] = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert pod["terminationGracePeriodSeconds"] == 20 + 8 + 2
    assert env["AGENT_DRAIN_TIMEOUT_SECONDS"] == "20"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert spec["replicas"] == 2
    assert {v["name"]: v for v in pod["volumes"]}["data"]["emptyDir"]["sizeLimit"] == "64Mi"
    assert [t["topologyKey"] for t in pod["topologySpreadConstraints"]] == [
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    ]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "3460"
    assert env["DELEGATE_TOKEN_FILE"] == "/var/run/secrets/delegate-agent/token/token"
    assert (
        next(e for e in c["env"] if e["name"] == "DELEGATE_NAME")["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.name"
    )


def test_irsa_is_one_value() -> None:
    """serviceAccount.roleArn becomes the eks.amazonaws.com/role-arn annotation."""
    sa = one(render(*VARIANTS["irsa"]), "ServiceAccount")
    assert (
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/delegate-agent"
    )
    assert "annotations" not in one(render(), "ServiceAccount")["metadata"]


def test_service_monitor_only_where_the_operator_exists() -> None:
    """ServiceMonitor appears with the Prometheus Operator's API (auto) and not without it."""
    assert "ServiceMonitor" not in kinds(render())
    sm = one(render(*VARIANTS["service-monitor"]), "ServiceMonitor")
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert "ServiceMonitor" not in kinds(
        render(*VARIANTS["service-monitor"], "--set", "metrics.serviceMonitor.enabled=false")
    )


@pytest.mark.parametrize("variant", ["autoscaling", "keda"])
def test_autoscaling_owns_the_replica_count(variant: str) -> None:
    """With an HPA (or KEDA) the Deployment has no replicas field."""
    docs = render(*VARIANTS[variant])
    assert "replicas" not in one(docs, "Deployment")["spec"]
    if variant == "autoscaling":
        assert one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    else:
        query = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
        assert "delegate_task_slots_busy" in query and "HorizontalPodAutoscaler" not in kinds(docs)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "delegate.capacity=0"], "delegate.capacity: Must be greater than or equal to 1"),
        (["--set", "controlPlane.url=not-a-url"], "controlPlane.url: Does not match pattern"),
        (["--set", "serviceAccount.roleArn=my-role"], "serviceAccount.roleArn: Does not match pattern"),
        (["--set-json", 'delegate.tags=["has space"]'], "delegate.tags.0: Does not match pattern"),
        (["--set", "logging.format=xml"], "logging.format: logging.format must be one of the following"),
        (["--set", "replicaz=3"], "Additional property replicaz is not allowed"),
        (["--set", "token.existingSecret="], "token: Must validate at least one schema"),
        (
            [
                "--set",
                "autoscaling.enabled=true",
                "--set",
                "keda.enabled=true",
                "--set",
                "keda.prometheusServerAddress=http://p",
            ],
            "are exclusive",
        ),
    ],
)
def test_invalid_values_are_refused_with_a_clear_message(args: list[str], words: str) -> None:
    """values.schema.json (and the templates) refuse bad values at install, naming them."""
    out = helm("template", "rel", str(CHART), *REQUIRED, *args, check=False)
    assert out.returncode != 0
    assert words in out.stderr, out.stderr


def test_the_notes_say_how_to_check_registration(tmp_path: Path) -> None:
    """NOTES.txt renders and tells the user how to see the delegate registered."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "notes-check.yaml").write_text(
        "# notes\n"
        + "\n".join("# " + line for line in (chart / "templates" / "NOTES.txt").read_text().splitlines())
        + "\n"
    )
    out = helm("template", "rel", str(chart), *REQUIRED, "--show-only", "templates/notes-check.yaml")
    assert "curl -s localhost:3460/status" in out.stdout
    assert "delegate-agent delegates list" in out.stdout


def test_the_dockerfile_passes_hadolint() -> None:
    """hadolint (from a wheel) finds nothing in the Dockerfile."""
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
