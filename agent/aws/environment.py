"""The standard AWS settings, read once from an explicit environment mapping.

Honoured for every call: ``AWS_ENDPOINT_URL`` and ``AWS_ENDPOINT_URL_<SERVICE>``,
``AWS_STS_REGIONAL_ENDPOINTS``, ``AWS_CA_BUNDLE``, ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``,
``AWS_EC2_METADATA_SERVICE_ENDPOINT`` (and the IMDS switches), ``AWS_MAX_ATTEMPTS`` and
``AWS_RETRY_MODE``. The mapping is also what the "inherit from delegate" default chain reads (the
pod's own identity), so tests pass a dict instead of changing ``os.environ``.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from agent._values import bounded_message, parse_bounded, quoted
from agent.protocol.models import Problem

RetryMode = Literal["standard", "adaptive", "legacy"]

_KEEP_PREFIXES = ("AWS_",)
_KEEP_NAMES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class AwsEnvironment:
    endpoint_url: str | None = None
    #: Lower-cased service id (sts, ec2, iam) -> endpoint URL.
    service_endpoints: Mapping[str, str] = field(default_factory=dict)
    sts_regional_endpoints: Literal["regional", "legacy"] = "regional"
    ca_bundle: str | None = None
    #: Proxy URLs may hold a user and password (botocore sends them as Proxy-Authorization): not in repr.
    https_proxy: str | None = field(default=None, repr=False)
    http_proxy: str | None = field(default=None, repr=False)
    no_proxy: str | None = None
    metadata_endpoint: str | None = None
    metadata_disabled: bool = False
    metadata_v1_disabled: bool = True
    metadata_timeout: float = 1.0
    metadata_attempts: int = 2
    max_attempts: int = 3
    retry_mode: RetryMode = "standard"
    use_fips: bool = False
    #: Per-call socket timeouts (agent settings; the whole test is bounded separately).
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    #: The AWS_* (and proxy) variables as given: the default chain's view of the pod.
    variables: Mapping[str, str] = field(default_factory=dict, repr=False)

    def endpoint_for(self, service: str) -> str | None:
        if self.variables.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() in _TRUE:
            return None
        return self.service_endpoints.get(service.lower()) or self.endpoint_url

    def endpoint_overrides(self) -> tuple[tuple[str, str], ...]:
        """(variable, URL) of each endpoint override in force, per-service ones first (they win)."""
        if self.variables.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() in _TRUE:
            return ()
        pairs = [(f"AWS_ENDPOINT_URL_{service.upper()}", url) for service, url in self.service_endpoints.items()]
        if self.endpoint_url:
            pairs.append(("AWS_ENDPOINT_URL", self.endpoint_url))
        return tuple(pairs)

    def through_proxy(
        self, proxy_url: str, *, user: str | None = None, password: str | None = None, no_proxy: str | None = None
    ) -> AwsEnvironment:
        """Every AWS call through the delegate's proxy (Harness's PROXY_*), which wins over HTTP(S)_PROXY.

        The user and password go into the URL, from where botocore sends them as Proxy-Authorization
        (to the proxy only, also inside a CONNECT tunnel).
        """
        if user:
            scheme, _, rest = proxy_url.partition("://")
            auth = urllib.parse.quote(user, safe="") + ":" + urllib.parse.quote(password or "", safe="")
            proxy_url = f"{scheme}://{auth}@{rest}"
        return replace(self, https_proxy=proxy_url, http_proxy=proxy_url, no_proxy=no_proxy or self.no_proxy)

    def trusting(self, extra_ca: Path, directory: Path) -> AwsEnvironment:
        """Trust ``extra_ca`` (a PEM file or a directory of them) besides the CA bundle in force.

        botocore takes one bundle, which replaces the default, so this writes the bundle in force
        (AWS_CA_BUNDLE, else botocore's default) plus the extra certificates
        to ``directory``/aws-ca-bundle.pem and points ``ca_bundle`` at it.
        """
        from botocore.httpsession import get_cert_path  # noqa: PLC0415 - only a delegate that runs needs it

        parts = [Path(self.ca_bundle or get_cert_path(True)).read_text()]
        for pem in sorted(extra_ca.iterdir()) if extra_ca.is_dir() else [extra_ca]:
            if pem.is_file():
                parts.append(pem.read_text())
        bundle = directory / "aws-ca-bundle.pem"
        bundle.write_text("\n".join(part.rstrip("\n") for part in parts) + "\n")
        return replace(self, ca_bundle=str(bundle))

    def proxies_for(self, url: str) -> dict[str, str]:
        """The proxy to use for ``url``, honouring ``NO_PROXY`` the way curl and botocore do."""
        proxies = {k: v for k, v in (("https", self.https_proxy), ("http", self.http_proxy)) if v}
        if not proxies:
            return {}
        host = urllib.parse.urlsplit(url).hostname or ""
        if self.no_proxy and urllib.request.proxy_bypass_environment(host, {"no": self.no_proxy}):  # type: ignore[attr-defined]
            return {}
        return proxies

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> tuple[AwsEnvironment, list[Problem]]:
        """Parse the settings; problems (bad numbers, unknown modes) are returned, not raised."""
        problems: list[Problem] = []
        env = {k: v for k, v in environ.items() if k.startswith(_KEEP_PREFIXES) or k in _KEEP_NAMES}

        def number(name: str, default: float, lo: float, hi: float, *, integer: bool = False) -> float:
            raw = env.get(name)
            if not raw:
                return default
            value = parse_bounded(raw, lo, hi, integer=integer)
            if value is None:
                problems.append(Problem(field=name, message=bounded_message(raw, lo, hi, integer=integer)))
                return default
            return value

        mode = env.get("AWS_RETRY_MODE", "standard") or "standard"
        if mode not in ("standard", "adaptive", "legacy"):
            problems.append(
                Problem(field="AWS_RETRY_MODE", message=f"must be standard, adaptive or legacy, not {quoted(mode)}")
            )
            mode = "standard"
        sts = (env.get("AWS_STS_REGIONAL_ENDPOINTS") or "regional").lower()
        if sts not in ("regional", "legacy"):
            problems.append(
                Problem(field="AWS_STS_REGIONAL_ENDPOINTS", message=f"must be regional or legacy, not {quoted(sts)}")
            )
            sts = "regional"
        service_endpoints: dict[str, str] = {}
        for key, value in env.items():
            if key.startswith("AWS_ENDPOINT_URL_") and value:
                service_endpoints[key.removeprefix("AWS_ENDPOINT_URL_").lower()] = value
        urls = [("AWS_ENDPOINT_URL", env.get("AWS_ENDPOINT_URL"))]
        urls += [(f"AWS_ENDPOINT_URL_{svc.upper()}", url) for svc, url in service_endpoints.items()]
        for name, url in urls:
            if url and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                problems.append(Problem(field=name, message=f"must be an http(s) URL, not {quoted(url)}"))
        metadata_v1 = env.get("AWS_EC2_METADATA_V1_DISABLED", "true").lower() in _TRUE
        parsed = cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
            service_endpoints=service_endpoints,
            sts_regional_endpoints=sts,  # type: ignore[arg-type]
            ca_bundle=env.get("AWS_CA_BUNDLE") or None,
            https_proxy=env.get("HTTPS_PROXY") or env.get("https_proxy") or None,
            http_proxy=env.get("HTTP_PROXY") or env.get("http_proxy") or None,
            no_proxy=env.get("NO_PROXY") or env.get("no_proxy") or None,
            metadata_endpoint=env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or None,
            metadata_disabled=env.get("AWS_EC2_METADATA_DISABLED", "").lower() in _TRUE,
            metadata_v1_disabled=metadata_v1,
            metadata_timeout=number("AWS_METADATA_SERVICE_TIMEOUT", 1.0, 0.05, 60),
            metadata_attempts=int(number("AWS_METADATA_SERVICE_NUM_ATTEMPTS", 2, 1, 10, integer=True)),
            max_attempts=int(number("AWS_MAX_ATTEMPTS", 3, 1, 20, integer=True)),
            retry_mode=mode,  # type: ignore[arg-type]
            use_fips=env.get("AWS_USE_FIPS_ENDPOINT", "").lower() in _TRUE,
            variables=env,
        )
        return parsed, problems
