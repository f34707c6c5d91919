"""The control-plane chart rendered by a real helm, validated with kubernetes-validate, in both modes."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent.cli import build_parser
from agent.controlplane.routes import ROUTES
from tests.test_chart import CRDS, DIGEST, EKS_VERSIONS, ROOT, helm, kinds, one

CHART = ROOT / "helm" / "control-plane"
DELEGATE_CHART = ROOT / "helm" / "delegate-agent"
SECRETS = "/var/run/secrets/control-plane"
POSTGRES = [
    "--set",
    "database.existingSecret=cp-database",
    "--set",
    "credentials.existingSecret=cp-credentials",
]
VARIANTS = {
    "sqlite": [],
    "sqlite-with-credentials": ["--set", "credentials.existingSecret=cp-credentials"],
    "sqlite-existing-claim": ["--set", "persistence.existingClaim=cp-data", "--set", "persistence.keep=false"],
    "sqlite-no-persistence": ["--set", "persistence.enabled=false"],
    "postgres": POSTGRES,
    "sqlite-oidc": ["--set", "oidc.issuer=https://cp.example.com/oidc"],
    "postgres-oidc": [
        *POSTGRES,
        "--set",
        "oidc.issuer=https://cp.example.com/oidc",
        "--set",
        "oidc.keysSecret=cp-oidc-keys",
    ],
    "postgres-3-pgbouncer": [
        *POSTGRES,
        "--set",
        "replicaCount=3",
        "--set",
        "database.listenUrlKey=listen-url",
        "--set",
        "podAntiAffinity=hard",
    ],
    "service-monitor-tls": [
        *POSTGRES,
        "--set",
        "tls.existingSecret=cp-tls",
        "--api-versions",
        "monitoring.coreos.com/v1",
    ],
    "network-policy": [
        *POSTGRES,
        "--set",
        "networkPolicy.enabled=true",
        "--set-json",
        'networkPolicy.from=[{"namespaceSelector":{"matchLabels":{"team":"delegates"}}}]',
        "--set-json",
        'networkPolicy.database.cidrs=["10.30.0.0/16"]',
        "--set-json",
        "networkPolicy.database.ports=[6432,5432]",
        "--set-json",
        'networkPolicy.extraEgress=[{"ports":[{"port":443}]}]',
    ],
    "everything": [
        *POSTGRES,
        "--set",
        "replicaCount=4",
        "--set",
        "database.listenUrlKey=listen-url",
        "--set",
        "tls.existingSecret=cp-tls",
        "--set",
        f"image.digest={DIGEST}",
        "--set",
        "service.type=LoadBalancer",
        "--set-json",
        'extraArgs=["--lease-seconds","60"]',
        "--set-json",
        'extraEnv=[{"name":"AWS_STS_REGIONAL_ENDPOINTS","value":"regional"}]',
        "--set-json",
        'extraVolumes=[{"name":"platform-secrets","secret":{"secretName":"platform-secrets"}}]',
        "--set-json",
        'extraVolumeMounts=[{"name":"platform-secrets","mountPath":"/etc/platform-secrets","readOnly":true}]',
        "--set",
        "networkPolicy.enabled=true",
        "--api-versions",
        "monitoring.coreos.com/v1",
    ],
}


def render(*args: str, chart: Path = CHART) -> list[dict[str, Any]]:
    out = helm("template", "rel", str(chart), "--namespace", "control-plane", *args)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def refused(*args: str) -> str:
    """helm's stderr for values the chart must refuse."""
    out = helm("template", "rel", str(CHART), *args, check=False)
    assert out.returncode != 0, out.stdout
    return out.stderr


def pod_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [c] = pod_of(docs)["containers"]
    return c  # type: ignore[no-any-return]


def env_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(docs)["env"]}


def volumes_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_of(docs)["volumes"]}


def mounts_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container(docs)["volumeMounts"]}


def test_helm_lint_strict() -> None:
    """helm lint --strict passes with the defaults (SQLite) and with Postgres."""
    for values in ([], POSTGRES):
        out = helm("lint", "--strict", str(CHART), *values)
        assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_manifest_validates_against_eks_versions(variant: str) -> None:
    """kubernetes-validate in strict mode (unknown fields are errors), for each supported EKS version."""
    docs = render(*VARIANTS[variant])
    assert docs
    for doc in docs:
        assert doc["metadata"]["namespace"] == "control-plane", (doc["kind"], doc["metadata"])
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
            continue
        for version in EKS_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_defaults_run_one_replica_on_sqlite_with_its_data_on_a_claim() -> None:
    """No values at all: one replica, Recreate, --data-dir on a kept PVC, no PDB, no database variable."""
    docs = render()
    assert kinds(docs) == ["Deployment", "PersistentVolumeClaim", "Service", "ServiceAccount"]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # the old pod lets go of the data dir first
    c = container(docs)
    assert c["command"] == ["delegate-agent", "control-plane"]
    assert c["args"] == [
        "--listen=0.0.0.0:8080",
        "--log-format=json",
        "--log-level=info",
        "--data-dir=/var/lib/control-plane/data",
    ]
    assert not {k for k in env_of(docs) if k.startswith("CONTROL_PLANE_")}
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    assert volumes_of(docs)["data"]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
    assert mounts_of(docs)["data"]["mountPath"] == "/var/lib/control-plane"
    pod = pod_of(docs)
    assert "affinity" not in pod and "topologySpreadConstraints" not in pod  # one replica: nothing to spread


def test_sqlite_persistence_can_use_an_existing_claim_or_none() -> None:
    """persistence.existingClaim mounts that claim and creates none; persistence.enabled=false is an emptyDir."""
    docs = render(*VARIANTS["sqlite-existing-claim"])
    assert "PersistentVolumeClaim" not in kinds(docs)
    assert volumes_of(docs)["data"]["persistentVolumeClaim"] == {"claimName": "cp-data"}
    docs = render(*VARIANTS["sqlite-no-persistence"])
    assert "PersistentVolumeClaim" not in kinds(docs)
    assert volumes_of(docs)["data"] == {"name": "data", "emptyDir": {}}
    claim = one(
        render("--set", "persistence.storageClass=gp3", "--set", "persistence.size=5Gi"), "PersistentVolumeClaim"
    )
    assert (claim["spec"]["storageClassName"], claim["spec"]["resources"]["requests"]["storage"]) == ("gp3", "5Gi")


def test_postgres_runs_two_replicas_by_default_with_the_url_from_the_secret() -> None:
    """database.existingSecret: 2 replicas, rolling update, the URL as a secretKeyRef, no data dir, no claim."""
    docs = render(*POSTGRES)
    assert kinds(docs) == ["Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    env = env_of(docs)
    assert env["CONTROL_PLANE_DATABASE_URL"] == {"secretKeyRef": {"name": "cp-database", "key": "url"}}
    assert "CONTROL_PLANE_DATABASE_LISTEN_URL" not in env
    args = container(docs)["args"]
    assert not [a for a in args if a.startswith("--data-dir")]
    assert "data" not in volumes_of(docs) and "data" not in mounts_of(docs)


def test_every_replica_gets_the_same_credentials_from_the_secret() -> None:
    """The credentials Secret is mounted whole (so a rotated token file is re-read) and named by the flags."""
    docs = render(*POSTGRES)
    args = container(docs)["args"]
    assert args[-3:] == [
        f"--delegate-token-file={SECRETS}/credentials/delegate-tokens",
        f"--api-key-file={SECRETS}/credentials/api-keys",
        f"--task-signing-key-file={SECRETS}/credentials/task-signing-key",
    ]
    mount = mounts_of(docs)["credentials"]
    assert mount == {"name": "credentials", "mountPath": f"{SECRETS}/credentials", "readOnly": True}
    assert "subPath" not in mount  # subPath mounts are never refreshed by the kubelet
    assert volumes_of(docs)["credentials"]["secret"] == {
        "secretName": "cp-credentials",
        "defaultMode": 0o400,
        "items": [{"key": k, "path": k} for k in ("delegate-tokens", "api-keys", "task-signing-key")],
    }
    # SQLite takes them too when given; without them it generates its own into the data dir.
    assert "credentials" in volumes_of(render(*VARIANTS["sqlite-with-credentials"]))
    assert "credentials" not in volumes_of(render())


def test_three_replicas_behind_pgbouncer_spread_and_keep_one_up() -> None:
    """replicaCount 3 with a listen URL: its secretKeyRef, a PDB of minAvailable 1, spread and anti-affinity."""
    docs = render(*VARIANTS["postgres-3-pgbouncer"])
    assert one(docs, "Deployment")["spec"]["replicas"] == 3
    env = env_of(docs)
    assert env["CONTROL_PLANE_DATABASE_LISTEN_URL"] == {"secretKeyRef": {"name": "cp-database", "key": "listen-url"}}
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    selector = {"app.kubernetes.io/name": "control-plane", "app.kubernetes.io/instance": "rel"}
    assert pdb == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    pod = pod_of(docs)
    assert [(t["topologyKey"], t["labelSelector"]["matchLabels"]) for t in pod["topologySpreadConstraints"]] == [
        ("topology.kubernetes.io/zone", selector),
        ("kubernetes.io/hostname", selector),
    ]
    [hard] = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert hard == {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": selector}}
    [soft] = pod_of(render(*POSTGRES))["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert soft["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert "affinity" not in pod_of(render(*POSTGRES, "--set", "podAntiAffinity=none"))
    term = {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}
    given = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}
    assert pod_of(render(*POSTGRES, "--set-json", f"affinity={json.dumps(given)}"))["affinity"] == given


def test_the_pod_is_locked_down_like_the_delegates() -> None:
    """The same pod and container securityContext as the delegate chart, and no service account token."""
    delegate = render(
        "--set", "controlPlane.url=https://cp.example", "--set", "token.existingSecret=t", chart=DELEGATE_CHART
    )
    for docs in (render(), render(*POSTGRES)):
        assert pod_of(docs)["securityContext"] == pod_of(delegate)["securityContext"]
        assert container(docs)["securityContext"] == container(delegate)["securityContext"]
        assert pod_of(docs)["securityContext"]["runAsUser"] == 10001
        assert container(docs)["securityContext"]["readOnlyRootFilesystem"] is True
        assert container(docs)["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert pod_of(docs)["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod_of(docs)["automountServiceAccountToken"] is False
        assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
        assert container(docs)["resources"]["limits"]["memory"] == "512Mi"
        assert volumes_of(docs)["tmp"]["emptyDir"] == {"sizeLimit": "32Mi"}  # the root filesystem is read-only


def test_the_probes_and_the_scrape_path_are_routes_the_control_plane_serves() -> None:
    """Liveness /healthz, readiness /readyz, metrics /metrics: each a GET route of the control plane."""
    served = {r.path for r in ROUTES if r.method == "GET"}
    docs = render(*POSTGRES)
    c = container(docs)
    probes = {name: c[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {n: (p["path"], p["port"], p["scheme"]) for n, p in probes.items()} == {
        "startupProbe": ("/healthz", "http", "HTTP"),
        "livenessProbe": ("/healthz", "http", "HTTP"),
        "readinessProbe": ("/readyz", "http", "HTTP"),
    }
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert {p["path"] for p in probes.values()} | {annotations["prometheus.io/path"]} <= served
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    [port] = one(docs, "Service")["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (8080, "http")


def test_tls_serves_https_and_probes_and_scrapes_follow() -> None:
    """tls.existingSecret: --tls-cert/--tls-key from the mounted Secret, HTTPS probes, an https ServiceMonitor."""
    docs = render(*VARIANTS["service-monitor-tls"])
    args = container(docs)["args"]
    assert f"--tls-cert={SECRETS}/tls/tls.crt" in args and f"--tls-key={SECRETS}/tls/tls.key" in args
    assert volumes_of(docs)["tls"]["secret"]["secretName"] == "cp-tls"
    assert {container(docs)[p]["httpGet"]["scheme"] for p in ("livenessProbe", "readinessProbe")} == {"HTTPS"}
    [endpoint] = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "30s", "scheme": "https"}


def test_service_monitor_only_where_the_operator_exists() -> None:
    """ServiceMonitor with the Prometheus Operator's API (auto), not without it, never when disabled."""
    assert "ServiceMonitor" not in kinds(render(*POSTGRES))
    assert "ServiceMonitor" in kinds(render(*POSTGRES, "--api-versions", "monitoring.coreos.com/v1"))
    off = render(
        *POSTGRES, "--api-versions", "monitoring.coreos.com/v1", "--set", "metrics.serviceMonitor.enabled=false"
    )
    assert "ServiceMonitor" not in kinds(off)


def test_the_network_policy_opens_the_api_port_dns_and_postgres() -> None:
    """Ingress to the API port from the given peers; egress to DNS, Postgres/PgBouncer's ports, what was added."""
    assert "NetworkPolicy" not in kinds(render(*POSTGRES))
    policy = one(render(*VARIANTS["network-policy"]), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    [ingress] = policy["ingress"]
    assert ingress == {
        "ports": [{"port": "http", "protocol": "TCP"}],
        "from": [{"namespaceSelector": {"matchLabels": {"team": "delegates"}}}],
    }
    dns, database, extra = policy["egress"]
    assert [p["port"] for p in dns["ports"]] == [53, 53]
    assert database == {
        "ports": [{"port": 6432, "protocol": "TCP"}, {"port": 5432, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "10.30.0.0/16"}}],
    }
    assert extra == {"ports": [{"port": 443}]}
    # SQLite has no database to reach.
    [only_dns] = one(render("--set", "networkPolicy.enabled=true"), "NetworkPolicy")["spec"]["egress"]
    assert only_dns["ports"][0]["port"] == 53


def test_image_by_tag_or_digest() -> None:
    """image.digest gives repository@sha256:... and wins over the tag."""
    assert container(render())["image"] == "ghcr.io/example/delegate-agent:0.1.0"
    pinned = container(render("--set", "image.tag=0.2.0", "--set", f"image.digest={DIGEST}"))["image"]
    assert pinned == f"ghcr.io/example/delegate-agent@{DIGEST}"


def test_extra_args_env_and_volumes_come_after_the_charts_own() -> None:
    """extraArgs, extraEnv, extraVolumes and extraVolumeMounts land as given, after the chart's."""
    docs = render(*VARIANTS["everything"])
    assert container(docs)["args"][-2:] == ["--lease-seconds", "60"]
    assert list(env_of(docs))[-1] == "AWS_STS_REGIONAL_ENDPOINTS"
    assert list(volumes_of(docs)) == ["credentials", "tls", "tmp", "platform-secrets"]
    assert list(mounts_of(docs)) == ["credentials", "tls", "tmp", "platform-secrets"]
    assert one(docs, "Service")["spec"]["type"] == "LoadBalancer"


def _control_plane_help() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["control-plane", "--help"])
    return out.getvalue()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_rendered_args_parse_as_the_control_planes_flags(variant: str) -> None:
    """The container's command and args are a valid `delegate-agent control-plane` command line."""
    c = container(render(*VARIANTS[variant]))
    postgres = "CONTROL_PLANE_DATABASE_URL" in {e["name"] for e in c["env"]}
    if postgres and "--database" not in _control_plane_help():
        pytest.skip("this control plane has no Postgres store yet (no --database flag)")
    args = build_parser().parse_args([c["command"][1], *c["args"]])
    assert args.listen == "0.0.0.0:8080"
    assert (args.data_dir is None) == postgres


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["--set", "replicaCount=3"],
            "replicaCount is 3, but without database.existingSecret the control plane keeps its state in SQLite",
        ),
        (
            ["--set", "database.existingSecret=db"],
            "database.existingSecret is set, so credentials.existingSecret is required",
        ),
        (["--set", "database.listenUrlKey=listen"], "database.listenUrlKey names a key of database.existingSecret"),
        (["--set", "database.url=postgresql://cp:hunter2@db:5432/cp"], "Additional property url is not allowed"),
        (["--set", "credentials.apiKey=hunter2"], "Additional property apiKey is not allowed"),
        (["--set", "replicaCount=-1"], "replicaCount: Must be greater than or equal to 0"),
        (["--set", "podAntiAffinity=always"], "podAntiAffinity: podAntiAffinity must be one of the following"),
        (["--set", "image.digest=0123abcd"], "image.digest: Does not match pattern"),
        (["--set-json", 'extraVolumes=[{"name":"data","emptyDir":{}}]'], "the chart's own volume"),
        (["--set-json", "extraArgs=[60]"], "extraArgs.0: Invalid type"),
    ],
)
def test_invalid_values_are_refused_with_a_clear_message(args: list[str], words: str) -> None:
    """values.schema.json and the templates refuse bad values at render time, naming them."""
    stderr = refused(*args)
    assert words in stderr, stderr


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_secret_value_is_ever_rendered(variant: str) -> None:
    """Secrets are referenced by name only: no Secret object, no URL, every database variable a secretKeyRef."""
    out = helm("template", "rel", str(CHART), *VARIANTS[variant]).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert "Secret" not in kinds(docs)
    assert "postgresql://" not in out and "postgres://" not in out
    for e in container(docs)["env"]:
        if e["name"].startswith("CONTROL_PLANE_DATABASE"):
            assert set(e) == {"name", "valueFrom"}, e


def test_the_notes_say_which_mode_and_how_to_check(tmp_path: Path) -> None:
    """NOTES.txt renders for both modes and says where the state lives and how to check readiness."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "notes-check.yaml").write_text(
        "# notes\n" + "\n".join("# " + line for line in notes.splitlines()) + "\n"
    )

    def show(*args: str) -> str:
        return helm("template", "rel", str(chart), *args, "--show-only", "templates/notes-check.yaml").stdout

    sqlite, postgres = show(), show(*VARIANTS["postgres-3-pgbouncer"])
    assert "1 replica on SQLite, data in the PersistentVolumeClaim rel-control-plane-data" in sqlite
    assert "generated\n# into the data dir" in sqlite
    assert "3 replica(s) on Postgres (the URL from Secret cp-database, key url)" in postgres
    for text in (sqlite, postgres):
        assert "/readyz" in text and "http://rel-control-plane.default.svc:8080" in text
    assert "1 s poll" in show(*POSTGRES) and "1 s poll" not in postgres


def test_the_documented_install_renders_what_the_docs_say() -> None:
    """docs/deploy.md's `helm install ... helm/control-plane` command renders: 3 replicas, both URLs from the Secret."""
    docs_text = (ROOT / "docs" / "deploy.md").read_text()
    start = docs_text.index("helm install cp helm/control-plane")
    command = docs_text[start : docs_text.index("```", start)].replace("\\\n", " ")
    words = command.split()
    sets = [w for flag, w in itertools.pairwise(words) if flag == "--set"]
    docs = render(*[arg for s in sets for arg in ("--set", s)])
    assert one(docs, "Deployment")["spec"]["replicas"] == 3
    assert set(env_of(docs)) >= {"CONTROL_PLANE_DATABASE_URL", "CONTROL_PLANE_DATABASE_LISTEN_URL"}
    assert volumes_of(docs)["credentials"]["secret"]["secretName"] == "cp-credentials"


def test_oidc_issues_from_keys_every_replica_shares() -> None:
    """oidc.issuer turns the issuer on; with Postgres the keys come from one Secret, mounted whole."""
    docs = render(*VARIANTS["postgres-oidc"])
    args = container(docs)["args"]
    assert "--oidc-issuer=https://cp.example.com/oidc" in args
    assert f"--oidc-key-file={SECRETS}/oidc/oidc-keys.json" in args
    mount = mounts_of(docs)["oidc"]
    assert mount == {
        "name": "oidc",
        "mountPath": f"{SECRETS}/oidc",
        "readOnly": True,
    }  # no subPath: rotation reaches it
    assert volumes_of(docs)["oidc"]["secret"]["items"] == [{"key": "oidc-keys.json", "path": "oidc-keys.json"}]
    # SQLite generates and rotates its keys in the data dir.
    sqlite = render(*VARIANTS["sqlite-oidc"])
    assert "oidc" not in volumes_of(sqlite)
    assert not [a for a in container(sqlite)["args"] if a.startswith("--oidc-key-file")]


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ([*POSTGRES, "--set", "oidc.issuer=https://cp.example.com"], "oidc.keysSecret is required"),
        (["--set", "oidc.keysSecret=k"], "oidc.issuer is not"),
        (["--set", "oidc.issuer=http://cp.example.com"], "oidc.issuer"),  # the schema: https only
        (["--set", "oidc.issuer=https://cp.example.com:8443"], "oidc.issuer"),  # and no port
    ],
)
def test_oidc_values_aws_or_the_replicas_could_not_use_are_refused(values: list[str], words: str) -> None:
    assert words in refused(*values)
