"""The Helm chart rendered by a real helm, validated with kubernetes-validate, and the Dockerfile linted."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent.protocol.patterns import DELEGATE_NAME_RE
from agent.protocol.signing import TaskSigningKey
from agent.runtime.settings import SETTINGS, load_settings
from agent.runtime.signing import task_check_from_key

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
DIGEST = "sha256:" + "0123456789abcdef" * 4


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


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [c] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def env_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The delegate container's environment: each name's value (or its valueFrom)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(docs)["env"]}


def volumes_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}


def mounts_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container(docs)["volumeMounts"]}


VARIANTS = {
    "defaults": [],
    "irsa": ["--set", "serviceAccount.roleArn=arn:aws:iam::123456789012:role/delegate-agent"],
    "service-monitor": ["--api-versions", "monitoring.coreos.com/v1"],
    "autoscaling": ["--set", "autoscaling.enabled=true"],
    "keda": ["--set", "keda.enabled=true", "--set", "keda.prometheusServerAddress=http://prometheus:9090"],
    "mtls": [
        "--set",
        "mtls.existingSecret=delegate-mtls",
        "--set",
        "mtls.certKey=client.crt",
        "--set",
        "mtls.keyKey=client.key",
        "--set",
        "mtls.caKey=ca.crt",
    ],
    "digest-and-volumes": [
        "--set",
        f"image.digest={DIGEST}",
        "--set-json",
        'extraVolumes=[{"name":"corp-ca","configMap":{"name":"corp-ca"}},{"name":"scratch","emptyDir":{}}]',
        "--set-json",
        'extraVolumeMounts=[{"name":"corp-ca","mountPath":"/etc/corp-ca","readOnly":true},'
        '{"name":"scratch","mountPath":"/scratch"}]',
    ],
    "network-policy": [
        "--set",
        "networkPolicy.enabled=true",
        "--set-json",
        'networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]',
        "--set-json",
        'networkPolicy.controlPlane.cidrs=["10.20.0.0/16"]',
        "--set-json",
        'networkPolicy.controlPlane.peers=[{"namespaceSelector":{"matchLabels":{"team":"platform"}}}]',
        "--set-json",
        'networkPolicy.aws.cidrs=["10.0.128.0/20"]',
        "--set-json",
        'networkPolicy.aws.credentialCidrs=["169.254.169.254/32","169.254.170.23/32"]',
        "--set-json",
        'networkPolicy.extraEgress=[{"to":[{"ipBlock":{"cidr":"10.9.9.9/32"}}],"ports":[{"port":3128}]}]',
    ],
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
        "--set",
        "mtls.existingSecret=delegate-mtls",
        "--set",
        f"image.digest={DIGEST}",
        "--set-json",
        'extraVolumes=[{"name":"corp-ca","configMap":{"name":"corp-ca"}}]',
        "--set-json",
        'extraVolumeMounts=[{"name":"corp-ca","mountPath":"/etc/corp-ca","readOnly":true}]',
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


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_names_the_release_namespace(variant: str) -> None:
    """metadata.namespace is set on every object, so `helm template | kubectl apply` lands where helm would."""
    docs = render(*VARIANTS[variant])
    for doc in docs:
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


def test_every_replica_is_named_after_the_release_a_delegate_group() -> None:
    """DELEGATE_NAME is the release's full name, a constant, so a selector on it survives pod restarts."""
    [name] = [e for e in container(render())["env"] if e["name"] == "DELEGATE_NAME"]
    assert name == {"name": "DELEGATE_NAME", "value": "rel-delegate-agent"}  # not the pod's name (valueFrom)
    assert DELEGATE_NAME_RE.match(name["value"])
    assert env_of(render("--set", "delegate.name=eks-prod"))["DELEGATE_NAME"] == "eks-prod"
    out = helm("template", "delegate-agent", str(CHART), *REQUIRED)  # release named like the chart
    assert env_of([d for d in yaml.safe_load_all(out.stdout) if d])["DELEGATE_NAME"] == "delegate-agent"


def test_the_mtls_secret_is_mounted_and_the_delegate_settings_point_at_it() -> None:
    """mtls.existingSecret: its keys become fixed files in a read-only mount the client cert settings name."""
    docs = render(*VARIANTS["mtls"])
    env, mount, volume = env_of(docs), mounts_of(docs)["mtls"], volumes_of(docs)["mtls"]
    assert mount == {"name": "mtls", "mountPath": "/var/run/secrets/delegate-agent/mtls", "readOnly": True}
    assert volume["secret"] == {
        "secretName": "delegate-mtls",
        "defaultMode": 0o400,
        "items": [
            {"key": "client.crt", "path": "tls.crt"},
            {"key": "client.key", "path": "tls.key"},
            {"key": "ca.crt", "path": "ca.crt"},
        ],
    }
    files = {f"{mount['mountPath']}/{item['path']}" for item in volume["secret"]["items"]}
    assert {
        env["AGENT_CONTROL_PLANE_CLIENT_CERT_FILE"],
        env["AGENT_CONTROL_PLANE_CLIENT_KEY_FILE"],
        env["AGENT_CONTROL_PLANE_CA_FILE"],
    } == files
    # Without caKey the CA stays the system's (or controlPlane.caSecret's); without the Secret, no mTLS at all.
    env = env_of(render("--set", "mtls.existingSecret=delegate-mtls", "--set", "controlPlane.caSecret=cp-ca"))
    assert env["AGENT_CONTROL_PLANE_CA_FILE"] == "/var/run/secrets/delegate-agent/ca/ca.crt"
    defaults = render()
    assert not {k for k in env_of(defaults) if "CLIENT" in k or k.endswith("CA_FILE")}
    assert "mtls" not in volumes_of(defaults) and "mtls" not in mounts_of(defaults)


def test_the_rendered_environment_is_settings_the_delegate_reads(tmp_path: Path) -> None:
    """Every variable the chart sets is a delegate setting, and they load, files and all, as the pod would."""
    docs = render(*VARIANTS["everything"])
    env = env_of(docs)
    known = {name for row in SETTINGS for name in row.env}
    assert set(env) - known == {"TMPDIR", "AWS_STS_REGIONAL_ENDPOINTS"}  # the system's and extraEnv
    # Lay out the pod's mounts under tmp_path: a Secret with items holds those files; one without
    # holds the keys the settings name (the token, the CA); the rest are directories.
    root = {m["mountPath"]: tmp_path / m["mountPath"].lstrip("/") for m in container(docs)["volumeMounts"]}

    def local(value: str) -> str:
        mount = next((m for m in root if value == m or value.startswith(m + "/")), None)
        return value if mount is None else str(root[mount]) + value[len(mount) :]

    paths = {k: local(v) for k, v in env.items() if k in known}
    for name, mount in mounts_of(docs).items():
        volume, where = volumes_of(docs)[name], root[mount["mountPath"]]
        where.mkdir(parents=True)
        items = volume.get("secret", {}).get("items")
        named = [Path(v).name for v in paths.values() if Path(v).parent == where]
        for file in [i["path"] for i in items] if items else named if "secret" in volume else []:
            (where / file).write_text("x" * 32 + "\n")

    settings = load_settings(paths)
    cp = settings.control_plane
    assert (cp.client_cert_file, cp.client_key_file) == (
        tmp_path / "var/run/secrets/delegate-agent/mtls/tls.crt",
        tmp_path / "var/run/secrets/delegate-agent/mtls/tls.key",
    )
    assert cp.ca_file == tmp_path / "var/run/secrets/delegate-agent/ca/ca.crt"
    assert (settings.name, settings.tags) == ("fixed-name", ("eks", "prod"))


def test_the_task_public_key_turns_on_the_signature_check() -> None:
    """controlPlane.taskPublicKey becomes AGENT_TASK_PUBLIC_KEY, read as the delegate's key; a bad one is refused."""
    key = TaskSigningKey.generate().public_key_b64
    env = env_of(render("--set", f"controlPlane.taskPublicKey={key}"))
    assert env["AGENT_TASK_PUBLIC_KEY"] == key
    given = {k: v for k, v in env.items() if not k.endswith("_FILE") and k not in ("AGENT_DATA_DIR", "TMPDIR")}
    settings = load_settings({**given, "DELEGATE_TOKEN": "x" * 32})
    assert settings.control_plane.task_public_key == key
    assert task_check_from_key(settings.control_plane.task_public_key) is not None
    assert "AGENT_TASK_PUBLIC_KEY" not in env_of(render())  # empty by default: tasks are not checked
    out = helm("template", "rel", str(CHART), *REQUIRED, "--set", "controlPlane.taskPublicKey=not-a-key", check=False)
    assert out.returncode != 0
    assert "controlPlane.taskPublicKey: Does not match pattern" in out.stderr, out.stderr


def test_image_digest_pins_the_image() -> None:
    """image.digest gives repository@sha256:... and wins over the tag; without it, repository:tag."""
    assert container(render())["image"] == "ghcr.io/example/delegate-agent:0.1.0"
    assert container(render("--set", "image.tag=0.2.0"))["image"] == "ghcr.io/example/delegate-agent:0.2.0"
    pinned = container(render("--set", "image.tag=0.2.0", "--set", f"image.digest={DIGEST}"))["image"]
    assert pinned == f"ghcr.io/example/delegate-agent@{DIGEST}"


def test_extra_volumes_and_mounts_are_added_after_the_charts_own() -> None:
    """extraVolumes / extraVolumeMounts land as given, and the chart's own volumes stay."""
    docs = render(*VARIANTS["digest-and-volumes"])
    assert list(volumes_of(docs)) == ["token", "data", "tmp", "corp-ca", "scratch"]
    assert volumes_of(docs)["corp-ca"] == {"name": "corp-ca", "configMap": {"name": "corp-ca"}}
    assert list(mounts_of(docs)) == ["token", "data", "tmp", "corp-ca", "scratch"]
    assert mounts_of(docs)["corp-ca"] == {"name": "corp-ca", "mountPath": "/etc/corp-ca", "readOnly": True}


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
        [trigger] = one(docs, "ScaledObject")["spec"]["triggers"]
        assert "delegate_task_slots_busy" in trigger["metadata"]["query"] and "HorizontalPodAutoscaler" not in kinds(
            docs
        )
        assert trigger["metricType"] == "Value"  # a fleet-wide ratio; tests/test_autoscaling.py says why


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "delegate.capacity=0"], "delegate.capacity: Must be greater than or equal to 1"),
        (["--set", "controlPlane.url=not-a-url"], "controlPlane.url: Does not match pattern"),
        (["--set", "controlPlane.url=http://cp.example:8080"], "controlPlane.allowInsecure does not match: true"),
        (["--set-json", 'networkPolicy.aws.cidrs=["0.0.0.0"]'], "networkPolicy.aws.cidrs.0: Does not match pattern"),
        (["--set", "serviceAccount.roleArn=my-role"], "serviceAccount.roleArn: Does not match pattern"),
        (["--set-json", 'delegate.tags=["has space"]'], "delegate.tags.0: Does not match pattern"),
        (["--set", "logging.format=xml"], "logging.format: logging.format must be one of the following"),
        (["--set", "replicaz=3"], "Additional property replicaz is not allowed"),
        (["--set", "token.existingSecret="], "token: Must validate at least one schema"),
        (["--set", "image.digest=0123abcd"], "image.digest: Does not match pattern"),
        (["--set", "mtls.caKey=ca.crt"], "mtls.caKey names a key of mtls.existingSecret"),
        (
            ["--set", "mtls.existingSecret=m", "--set", "mtls.caKey=ca.crt", "--set", "controlPlane.caSecret=c"],
            "the control plane's CA is given twice",
        ),
        (["--set-json", 'extraVolumes=[{"name":"tmp","emptyDir":{}}]'], "the chart's own volume"),
        (["--set-json", 'extraVolumeMounts=[{"name":"x"}]'], "extraVolumeMounts.0: mountPath is required"),
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


def _rules(policy: dict[str, Any], direction: str) -> list[tuple[list[Any], list[dict[str, Any]]]]:
    """Each rule of a NetworkPolicy as (ports as (port, protocol), peers)."""
    peers = "from" if direction == "ingress" else "to"
    return [
        ([(p["port"], p.get("protocol", "TCP")) for p in rule["ports"]], rule.get(peers, []))
        for rule in policy["spec"][direction]
    ]


def test_no_network_policy_unless_asked() -> None:
    """networkPolicy.enabled is off by default: a CNI without enforcement, or other policies, stay unaffected."""
    assert "NetworkPolicy" not in kinds(render())


def test_the_network_policy_opens_only_the_probe_port_the_control_plane_dns_and_aws() -> None:
    """Ingress: the probe/metrics port from the given peers. Egress: control plane, DNS, AWS, what was added."""
    policy = one(render(*VARIANTS["network-policy"]), "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "delegate-agent",
        "app.kubernetes.io/instance": "rel",
    }
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert _rules(policy, "ingress") == [([("http", "TCP")], [monitoring])]
    control_plane, dns, aws, credentials, proxy = _rules(policy, "egress")
    assert control_plane == (
        [(8443, "TCP")],  # the port of controlPlane.url
        [{"ipBlock": {"cidr": "10.20.0.0/16"}}, {"namespaceSelector": {"matchLabels": {"team": "platform"}}}],
    )
    assert dns == (
        [(53, "UDP"), (53, "TCP")],
        [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
    )
    assert aws == ([(443, "TCP")], [{"ipBlock": {"cidr": "10.0.128.0/20"}}])
    assert credentials == (
        [(80, "TCP")],
        [{"ipBlock": {"cidr": "169.254.169.254/32"}}, {"ipBlock": {"cidr": "169.254.170.23/32"}}],
    )
    assert proxy == ([(3128, "TCP")], [{"ipBlock": {"cidr": "10.9.9.9/32"}}])
    [port] = container(render())["ports"]
    assert port["name"] == "http", "the ingress rule names the container's probe/metrics port"


@pytest.mark.parametrize(
    ("url", "args", "port"),
    [
        ("https://cp.example", [], 443),
        ("http://cp.example", ["--set", "controlPlane.allowInsecure=true"], 80),
        ("https://cp.example:8443", ["--set", "networkPolicy.controlPlane.port=9443"], 9443),
    ],
)
def test_the_control_plane_port_comes_from_its_url_unless_given(url: str, args: list[str], port: int) -> None:
    """Without networkPolicy.controlPlane.port the egress rule uses the URL's port, or the scheme's."""
    docs = render("--set", "networkPolicy.enabled=true", "--set", f"controlPlane.url={url}", *args)
    control_plane, _dns, aws = _rules(one(docs, "NetworkPolicy"), "egress")
    assert control_plane == ([(port, "TCP")], [])
    assert aws == ([(443, "TCP")], [{"ipBlock": {"cidr": "0.0.0.0/0"}}])


def test_a_plaintext_control_plane_needs_allow_insecure_and_the_delegate_accepts_it() -> None:
    """allowInsecure sets AGENT_ALLOW_INSECURE, and the rendered environment then loads as the pod's would."""
    docs = render("--set", "controlPlane.url=http://cp.example:8080", "--set", "controlPlane.allowInsecure=true")
    env = env_of(docs)
    assert env["AGENT_ALLOW_INSECURE"] == "true"
    plaintext = {k: env[k] for k in ("MANAGER_HOST_AND_PORT", "AGENT_ALLOW_INSECURE")}
    settings = load_settings(plaintext | {"DELEGATE_TOKEN": "t" * 20, "DELEGATE_NAME": "d"})
    assert settings.control_plane.allow_insecure
    assert "AGENT_ALLOW_INSECURE" not in env_of(render())


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
    assert "with\n# the name rel-delegate-agent, which every replica shares" in out.stdout


def test_the_dockerfile_passes_hadolint() -> None:
    """hadolint (from a wheel) finds nothing in the Dockerfile."""
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    out = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
