"""The delegate's settings: a YAML file plus environment variables, parsed once into frozen types.

One table, :data:`SETTINGS`, says for each setting its file key, its environment names, how it
parses, its default and what it means; the file keys accepted, the environment names read,
:meth:`AgentSettings.describe` and the settings block of ``config/agent.yaml`` (written by
``python -m agent.runtime.settings_doc``) all derive from it. Adding a setting is a row here, its
field in :class:`AgentSettings`, and its test.

Environment variables win over the file. The Harness delegate's names are accepted so its users
feel at home (``MANAGER_HOST_AND_PORT``, ``DELEGATE_TOKEN``, ``DELEGATE_NAME``, ``DELEGATE_TAGS``,
``DELEGATE_TASK_CAPACITY``, ``LOGGING_LEVEL``). Every problem is collected and reported together;
the caller prints them and exits 2. Parsing reads files but never writes: the outbox creates the
data dir when it opens it.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from agent._files import NotUtf8Text, data_dir_problem, read_text
from agent._values import bounded_message, clip, http_url, parse_bounded, quoted
from agent.observability.logging import LogFormat
from agent.protocol.auth import DEFAULT_AUDIENCE
from agent.protocol.models import Problem
from agent.protocol.patterns import DELEGATE_NAME_RE, TAG_RE
from agent.protocol.problems import ProblemsError


class ConfigError(ProblemsError):
    """The configuration has problems; all of them are in ``problems``."""


# --- how a value parses ------------------------------------------------------------------------
# Each parser takes what the environment (stripped text) or the YAML file (any YAML value) holds
# and returns the typed value, or raises _Invalid saying what the value must be.


class _Invalid(Exception):
    """A value that does not parse; the message says what it must be."""


def _text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _Invalid(f"must be text, not {type(value).__name__}")
    return str(value)


def _number(lo: float, hi: float, *, integer: bool = False) -> Callable[[object], float]:
    def parse(value: object) -> float:
        parsed = None if isinstance(value, bool) else parse_bounded(str(value), lo, hi, integer=integer)
        if parsed is None:
            raise _Invalid(bounded_message(str(value), lo, hi, integer=integer))
        return parsed

    return parse


def _one_of(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _text(value)
        if text not in choices:
            raise _Invalid(f"must be {' or '.join(choices)}, not {quoted(text)}")
        return text

    return parse


def _http_url(value: object) -> str:
    try:
        return http_url(_text(value))
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _path(value: object) -> Path:
    return Path(_text(value)).expanduser()


def _file(value: object) -> Path:
    path = _path(value)
    if not path.is_file():
        raise _Invalid(f"{path} does not exist or is not a file")
    return path


def _directory(value: object) -> Path:
    path = _path(value)
    if not path.is_dir():
        raise _Invalid(f"{path} does not exist or is not a directory")
    return path


def _token_file(value: object) -> Path:
    path = _file(value)
    try:
        empty = not read_text(path).strip()
    except NotUtf8Text as exc:
        raise _Invalid(str(exc)) from None
    except OSError as exc:
        raise _Invalid(f"cannot read {path}: {exc.strerror or exc}") from None
    if empty:
        raise _Invalid(f"{path} is empty")
    return path


def _data_dir(value: object) -> Path:
    """A directory the delegate can create or write, judged without writing anything."""
    path = _path(value)
    problem = data_dir_problem(path)
    if problem is not None:
        raise _Invalid(problem)
    return path


def _delegate_name(value: object) -> str:
    name = _text(value)
    if not DELEGATE_NAME_RE.match(name):
        raise _Invalid(
            f"{quoted(name)} must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        )
    return name


def _tags(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [t for t in re.split(r"\s*,+\s*", value.strip()) if t]  # as Harness parses DELEGATE_TAGS
    elif isinstance(value, list | tuple) and all(isinstance(t, str) for t in value):
        items = [t.strip() for t in value]
    else:
        raise _Invalid("must be a list of tags or a comma-separated string")
    bad = [t for t in items if not TAG_RE.match(t)]
    if bad:
        raise _Invalid(f"a tag has letters, digits and _.:/=+@- (starting with a letter or digit): {bad}")
    return tuple(dict.fromkeys(items))


def _listen(value: object) -> tuple[str, int]:
    listen = _text(value)
    host, sep, port = listen.rpartition(":")
    if not sep or parse_bounded(port, 0, 65535, integer=True) is None:
        raise _Invalid(f"must be HOST:PORT, not {quoted(listen)}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - probes and Prometheus reach the pod on its IP


_LOG_LEVELS = {"debug": "debug", "trace": "debug", "info": "info", "warning": "warning", "warn": "warning"}
_LOG_LEVELS |= {"error": "error", "critical": "critical", "off": "critical"}


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text not in _TRUE + _FALSE:
        raise _Invalid(f"must be true or false, not {quoted(text)}")
    return text in _TRUE


def _host(value: object) -> str:
    host = _text(value)
    if not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]+", host):
        raise _Invalid(f"must be a host name or address (no scheme, no port), not {quoted(host)}")
    return host


def ca_files(path: Path) -> list[Path]:
    """The certificate files of a CA setting: the file itself, or the files of a directory (a mounted
    Secret's ``..data`` directories are skipped; its symlinked keys are files)."""
    return [p for p in sorted(path.iterdir()) if p.is_file()] if path.is_dir() else [path]


def _ca_path(value: object) -> Path:
    """A PEM file, or a directory whose files are PEM certificates; each must load as CA certificates."""
    path = _path(value)
    if not path.exists():
        raise _Invalid(f"{path} does not exist")
    files = ca_files(path)
    if not files:
        raise _Invalid(f"{path} holds no certificate files")
    for pem in files:
        try:
            ssl.create_default_context(cafile=str(pem))
        except (ssl.SSLError, OSError, UnicodeDecodeError) as exc:
            raise _Invalid(f"{pem} is not a PEM CA certificate: {getattr(exc, 'reason', None) or exc}") from None
    return path


def _log_level(value: object) -> str:
    level = _text(value)
    if level.lower() not in _LOG_LEVELS:
        raise _Invalid(f"must be debug, info, warning or error, not {quoted(level)}")
    return _LOG_LEVELS[level.lower()]


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One row of the settings table; everything else about a setting derives from it."""

    #: Its path in the YAML file (``controlPlane.url``); also its name in describe() and the docs.
    key: str
    #: Environment variables, preferred first (Harness's name first where it has one).
    env: tuple[str, ...]
    #: Turns a file or environment value into the typed value (raises _Invalid with the reason).
    parse: Callable[[Any], Any]
    #: The :class:`AgentSettings` field it fills (``control_plane.url``); two for ``http.listen``.
    attr: str | tuple[str, ...]
    #: What it is for, as config/agent.yaml says it.
    doc: str
    #: The default as a user would write it, parsed like any value; a callable is asked; None: unset.
    default: Any = None
    #: Set when the setting is required: the problem reported when it is absent.
    required: str | None = None
    #: describe() says only whether a secret is set, never its value.
    secret: bool = False
    #: False for the environment only (the token never goes in a file).
    in_file: bool = True
    #: The YAML value config/agent.yaml shows (else the default), commented out when ``commented``.
    example: str | None = None
    commented: bool = False
    #: How describe() shows the value (else paths as text and tuples as lists).
    show: Callable[[Any], Any] | None = None

    @property
    def attrs(self) -> tuple[str, ...]:
        return (self.attr,) if isinstance(self.attr, str) else self.attr


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "controlPlane.url",
        ("MANAGER_HOST_AND_PORT", "AGENT_CONTROL_PLANE_URL"),
        _http_url,
        "control_plane.url",
        "The control plane's base URL (http or https).",
        required="is required: the control plane's URL (e.g. https://control-plane:8080)",
        example="http://127.0.0.1:8080",
    ),
    Setting(
        "controlPlane.allowInsecure",
        ("AGENT_ALLOW_INSECURE",),
        _boolean,
        "control_plane.allow_insecure",
        "Allow a plain http:// control plane on another host: the delegate token and each task's role ARN and "
        "External ID then cross the network unencrypted. Loopback URLs (localhost, 127.0.0.0/8, ::1) never "
        "need it.",
        default=False,
    ),
    Setting(
        "controlPlane.audience",
        ("AGENT_CONTROL_PLANE_AUDIENCE",),
        _text,
        "control_plane.audience",
        "The JWT audience the control plane expects (its --audience).",
        default=DEFAULT_AUDIENCE,
    ),
    Setting(
        "controlPlane.caFile",
        ("AGENT_CONTROL_PLANE_CA_FILE",),
        _file,
        "control_plane.ca_file",
        "CA bundle for an https control plane with a private CA (default: the system's).",
        example="/etc/delegate-agent/ca.pem",
        commented=True,
    ),
    Setting(
        "controlPlane.clientCertFile",
        ("DELEGATE_CLIENT_CERTIFICATE_PATH", "AGENT_CONTROL_PLANE_CLIENT_CERT_FILE"),
        _file,
        "control_plane.client_cert_file",
        "Client certificate for mutual TLS; needs clientKeyFile too.",
        example="/etc/delegate-agent/tls.crt",
        commented=True,
    ),
    Setting(
        "controlPlane.clientKeyFile",
        ("DELEGATE_CLIENT_CERTIFICATE_KEY_PATH", "AGENT_CONTROL_PLANE_CLIENT_KEY_FILE"),
        _file,
        "control_plane.client_key_file",
        "The client certificate's private key.",
        example="/etc/delegate-agent/tls.key",
        commented=True,
    ),
    Setting(
        "controlPlane.requestTimeoutSeconds",
        ("AGENT_CONTROL_PLANE_TIMEOUT_SECONDS",),
        _number(0.5, 300),
        "control_plane.request_timeout",
        "Budget for one request (a long poll gets its wait on top).",
        default=10,
    ),
    Setting(
        "controlPlane.taskPublicKey",
        ("AGENT_TASK_PUBLIC_KEY",),
        _text,
        "control_plane.task_public_key",
        "The control plane's Ed25519 public key (base64). When set, tasks without a valid signature are "
        "refused and never run.",
        example='"..."',
        commented=True,
    ),
    Setting(
        "delegate.name",
        ("DELEGATE_NAME",),
        _delegate_name,
        "name",
        "Defaults to the host name (the pod name on Kubernetes). It is also a tag.",
        default=socket.gethostname,
        example="eks-delegate-0",
        commented=True,
    ),
    Setting(
        "delegate.tags",
        ("DELEGATE_TAGS",),
        _tags,
        "tags",
        "Comma-separated in the environment. Connectors select delegates by these (all must match).",
        default=(),
        example="[eks, prod]",
    ),
    Setting(
        "delegate.capacity",
        ("DELEGATE_TASK_CAPACITY",),
        _number(1, 1024, integer=True),
        "capacity",
        "How many validations run at once.",
        default=16,
    ),
    Setting(
        "delegate.tokenFile",
        ("DELEGATE_TOKEN_FILE",),
        _token_file,
        "token_file",
        "The delegate token, re-read whenever it changes (rotation without a restart). Or set DELEGATE_TOKEN.",
        example="/var/run/secrets/delegate-agent/token",
    ),
    Setting(
        "delegate.token",
        ("DELEGATE_TOKEN", "ACCOUNT_SECRET"),
        _text,
        "token",
        "The delegate token itself, never written in this file (ACCOUNT_SECRET: Harness's older name).",
        secret=True,
        in_file=False,
    ),
    Setting(
        "http.listen",
        ("AGENT_HTTP_LISTEN",),
        _listen,
        ("http_host", "http_port"),
        "Where /healthz, /readyz, /metrics and /status are served.",
        default="0.0.0.0:3460",
        show=lambda host_port: f"{host_port[0]}:{host_port[1]}",
    ),
    Setting(
        "http.headerTimeoutSeconds",
        ("AGENT_HTTP_HEADER_TIMEOUT_SECONDS",),
        _number(0.1, 600),
        "http_header_timeout",
        "A connection to that port that has not sent its request line and headers by then is closed.",
        default=10,
    ),
    Setting(
        "http.keepAliveTimeoutSeconds",
        ("AGENT_HTTP_KEEPALIVE_TIMEOUT_SECONDS",),
        _number(0.1, 3600),
        "http_keepalive_timeout",
        "An idle connection to that port is closed after this long.",
        default=75,
    ),
    Setting(
        "http.maxConnections",
        ("AGENT_HTTP_MAX_CONNECTIONS",),
        _number(1, 10000, integer=True),
        "http_max_connections",
        "Open connections to that port at most; over it, the oldest one yet to send a request (or else idle "
        "between requests) is closed.",
        default=64,
    ),
    Setting(
        "dataDir",
        ("AGENT_DATA_DIR",),
        _data_dir,
        "data_dir",
        "Where undelivered results are kept (SQLite), so a restart loses none. Without it, results wait in "
        "memory and the delegate says so at startup.",
        example="/var/lib/delegate-agent",
    ),
    Setting(
        "secretsDir",
        ("AGENT_SECRETS_DIR",),
        _directory,
        "secrets_dir",
        "Where connector secret references resolve: account.NAME, org.NAME and NAME all read the file NAME "
        "here (mount a Kubernetes Secret).",
        example="/var/run/secrets/connectors",
        commented=True,
    ),
    Setting(
        "logging.format",
        ("AGENT_LOG_FORMAT",),
        _one_of(*get_args(LogFormat)),
        "log_format",
        "json or console (default: console on a terminal, json otherwise).",
        example="json",
    ),
    Setting(
        "logging.level",
        ("AGENT_LOG_LEVEL", "LOGGING_LEVEL"),
        _log_level,
        "log_level",
        "debug, info, warning or error.",
        default="info",
    ),
    Setting(
        "shutdown.drainTimeoutSeconds",
        ("AGENT_DRAIN_TIMEOUT_SECONDS",),
        _number(0, 3600),
        "drain_timeout",
        "On SIGTERM, how long running validations may finish before they are cancelled. The default leaves "
        "room in a 30 s termination grace period.",
        default=20,
    ),
    Setting(
        "shutdown.graceSeconds",
        ("AGENT_SHUTDOWN_GRACE_SECONDS",),
        _number(1, 600),
        "shutdown_grace",
        "Extra time to report, flush and deregister; after drain + grace a watchdog ends the process.",
        default=8,
    ),
    Setting(
        "aws.connectTimeoutSeconds",
        ("AGENT_AWS_CONNECT_TIMEOUT_SECONDS",),
        _number(0.1, 120),
        "aws_connect_timeout",
        "Connect timeout of each AWS call. The whole connection test is bounded by the task's timeout "
        "(2 minutes by default, as in Harness).",
        default=5,
    ),
    Setting(
        "aws.readTimeoutSeconds",
        ("AGENT_AWS_READ_TIMEOUT_SECONDS",),
        _number(0.1, 300),
        "aws_read_timeout",
        "Read timeout of each AWS call.",
        default=10,
    ),
    Setting(
        "tls.additionalCaPath",
        ("ADDITIONAL_CERTS_PATH", "AGENT_ADDITIONAL_CA_PATH"),
        _ca_path,
        "additional_ca_path",
        "CA certificates trusted besides the system's, for the control plane and AWS (a PEM file or a directory "
        "of them), as Harness's ADDITIONAL_CERTS_PATH. controlPlane.caFile and AWS_CA_BUNDLE replace the "
        "system's instead.",
        example="/opt/harness-delegate/ca-bundle",
        commented=True,
    ),
    Setting(
        "proxy.host",
        ("PROXY_HOST",),
        _host,
        "proxy_host",
        "HTTP proxy for AWS calls and (see proxy.manager) the control plane, as Harness's PROXY_HOST.",
        example="proxy.corp.example",
        commented=True,
    ),
    Setting(
        "proxy.port",
        ("PROXY_PORT",),
        _number(1, 65535, integer=True),
        "proxy_port",
        "The proxy's port; required with proxy.host.",
        example="3128",
        commented=True,
    ),
    Setting(
        "proxy.scheme",
        ("PROXY_SCHEME",),
        _one_of("http", "https"),
        "proxy_scheme",
        "How the delegate talks to the proxy: http or https (TLS to the proxy itself).",
        default="http",
    ),
    Setting(
        "proxy.user",
        ("PROXY_USER",),
        _text,
        "proxy_user",
        "User for the proxy's Basic authentication (sent as Proxy-Authorization).",
        example="delegate",
        commented=True,
    ),
    Setting(
        "proxy.password",
        ("PROXY_PASSWORD",),
        _text,
        "proxy_password",
        "The proxy user's password, never written in this file nor logged.",
        secret=True,
        in_file=False,
    ),
    Setting(
        "proxy.manager",
        ("PROXY_MANAGER",),
        _boolean,
        "proxy_manager",
        "Whether the control-plane connection goes through the proxy too (Harness's default: true).",
        default=True,
    ),
    Setting(
        "proxy.noProxy",
        ("NO_PROXY", "no_proxy"),
        _text,
        "no_proxy",
        "Comma-separated hosts or domains (.corp.example) reached directly, for AWS and the control plane.",
        example="169.254.169.254,.svc.cluster.local",
        commented=True,
    ),
)


def _file_keys() -> dict[str, set[str]]:
    """The YAML file's shape: each top-level key and the keys it holds (none for a plain value)."""
    keys: dict[str, set[str]] = {}
    for row in SETTINGS:
        if row.in_file:
            group, _, leaf = row.key.partition(".")
            keys.setdefault(group, set()).update([leaf] if leaf else [])
    return keys


_FILE_KEYS = _file_keys()


# --- the parsed settings -------------------------------------------------------------------------
# Field defaults are the table's, parsed (a test holds them equal; the name aside, which the table
# asks of the host); they serve code and tests that build settings directly.


@dataclass(frozen=True)
class ControlPlaneEndpoint:
    """Where the delegate finds its control plane and how it talks to it (the server's own settings
    are ``agent.controlplane.core.ControlPlaneSettings``)."""

    url: str
    audience: str = DEFAULT_AUDIENCE
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    request_timeout: float = 10.0
    task_public_key: str | None = None
    allow_insecure: bool = False

    @property
    def plaintext_remote(self) -> bool:
        """True for an http:// URL whose host is not this one (loopback traffic never leaves the host)."""
        return is_plaintext_remote(self.url)


@dataclass(frozen=True)
class AgentSettings:
    """Everything the delegate runs with; what each field means is in its row of :data:`SETTINGS`."""

    control_plane: ControlPlaneEndpoint
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    name: str = "delegate"
    tags: tuple[str, ...] = ()
    capacity: int = 16
    http_host: str = "0.0.0.0"  # noqa: S104 - probes and Prometheus reach the pod on its IP
    http_port: int = 3460
    http_header_timeout: float = 10.0
    http_keepalive_timeout: float = 75.0
    http_max_connections: int = 64
    data_dir: Path | None = None
    secrets_dir: Path | None = None
    log_format: LogFormat | None = None
    log_level: str = "info"
    drain_timeout: float = 20.0
    shutdown_grace: float = 8.0
    #: The CLI puts these into the AWS environment its handler uses (the runtime knows nothing of AWS).
    aws_connect_timeout: float = 5.0
    aws_read_timeout: float = 10.0
    additional_ca_path: Path | None = None
    proxy_host: str | None = None
    proxy_port: int | None = None
    proxy_scheme: str = "http"
    proxy_user: str | None = None
    proxy_password: str | None = field(default=None, repr=False)
    proxy_manager: bool = True
    no_proxy: str | None = None

    @property
    def http_listen(self) -> str:
        return f"{self.http_host}:{self.http_port}"

    @property
    def proxy_url(self) -> str | None:
        """The proxy as ``scheme://host:port``, without credentials (they go in a header), or None."""
        if not self.proxy_host or not self.proxy_port:
            return None
        host = self.proxy_host
        if ":" in host and not host.startswith("["):  # an IPv6 address
            host = f"[{host}]"
        return f"{self.proxy_scheme}://{host}:{self.proxy_port}"

    def proxy_bypassed(self, url: str) -> bool:
        """True when ``url``'s host is in NO_PROXY (as curl and botocore read it)."""
        host = urllib.parse.urlsplit(url).hostname or ""
        return bool(self.no_proxy) and bool(
            urllib.request.proxy_bypass_environment(host, {"no": self.no_proxy})  # type: ignore[attr-defined]
        )

    def control_plane_proxy(self) -> str | None:
        """The proxy for the control-plane connection: PROXY_MANAGER on, and the host not in NO_PROXY."""
        url = self.proxy_url
        if url is None or not self.proxy_manager or self.proxy_bypassed(self.control_plane.url):
            return None
        return url

    def secrets(self) -> tuple[str, ...]:
        """Every secret value these settings hold, for the redactor (and the forms they travel in)."""
        found = [self.token or ""]
        if self.proxy_password:
            found += [self.proxy_password, urllib.parse.quote(self.proxy_password, safe="")]
            basic = f"{self.proxy_user or ''}:{self.proxy_password}".encode()
            found.append(base64.b64encode(basic).decode())
        return tuple(dict.fromkeys(s for s in found if s))

    def describe(self) -> dict[str, Any]:
        """The effective settings in the config file's shape, for ``check-config`` and the startup log.

        Secrets show only as set or not.
        """
        described: dict[str, Any] = {}
        for row in SETTINGS:
            values = tuple(_field(self, attr) for attr in row.attrs)
            value = values[0] if len(values) == 1 else values
            *groups, leaf = row.key.split(".")
            node = described
            for group in groups:
                node = node.setdefault(group, {})
            node[leaf] = _shown(row, value)
        return described


def _field(settings: AgentSettings, attr: str) -> Any:
    value: Any = settings
    for part in attr.split("."):
        value = getattr(value, part)
    return value


def _shown(row: Setting, value: Any) -> Any:
    if row.secret:
        return "(set)" if value else None
    if value is None:
        return None
    if row.show is not None:
        return row.show(value)
    if isinstance(value, Path):
        return str(value)
    return list(value) if isinstance(value, tuple) else value


# --- the Harness delegate's other variables --------------------------------------------------------
# A Harness delegate's ConfigMap sets more than this delegate reads. Those with a meaning here are
# environment names in the table above; these have none, and are named once at startup and by
# check-config, so nobody believes they took effect.

_NO_CLIENT_TOOLS = "this delegate downloads and runs no client tools"
_ONE_KIND = "there is one kind of delegate here"
_CAPACITY = "the only limit here is DELEGATE_TASK_CAPACITY"

#: Harness delegate variables that mean nothing to this delegate, and why.
HARNESS_UNUSED: Mapping[str, str] = {
    "ACCOUNT_ID": "the delegate token names the account",
    "DEPLOY_MODE": _ONE_KIND,
    "DELEGATE_TYPE": _ONE_KIND,
    "NEXT_GEN": _ONE_KIND,
    "DELEGATE_DESCRIPTION": "not sent to the control plane",
    "DELEGATE_NAMESPACE": "not read (the pod's namespace does not change what it does)",
    "POLL_FOR_TASKS": "this delegate always long-polls over HTTP(S)",
    "JAVA_OPTS": "this delegate is not a JVM",
    "INIT_SCRIPT": "not run: install what you need in the image instead",
    "CLIENT_TOOLS_DOWNLOAD_DISABLED": _NO_CLIENT_TOOLS,
    "INSTALL_CLIENT_TOOLS_IN_BACKGROUND": _NO_CLIENT_TOOLS,
    "LOG_STREAMING_SERVICE_URL": "logs go to stdout only",
    "STACK_DRIVER_LOGGING_ENABLED": "logs go to stdout only",
    "DELEGATE_ORG_IDENTIFIER": "delegates are account-level here",
    "DELEGATE_PROJECT_IDENTIFIER": "delegates are account-level here",
    "DELEGATE_GROUP_NAME": "no delegate groups: DELEGATE_NAME names the delegate",
    "DELEGATE_GROUP_ID": "no delegate groups: DELEGATE_NAME names the delegate",
    "DELEGATE_PROFILE": "no delegate profiles",
    "DELEGATE_RESOURCE_THRESHOLD": _CAPACITY,
    "DELEGATE_CPU_THRESHOLD": _CAPACITY,
    "MEMORY_USAGE_THRESHOLD": _CAPACITY,
    "DYNAMIC_REQUEST_HANDLING": _CAPACITY,
    "BLOCK_SHELL_TASK": "this delegate runs no shell tasks",
    "ENABLE_CE": "no cloud cost features",
    "GRPC_SERVICE_ENABLED": "no gRPC service",
    "GRPC_SERVICE_CONNECTOR_PORT": "no gRPC service",
    "MANAGER_PROXY_CURL": "written by Harness's proxy_setup.sh; PROXY_* and PROXY_MANAGER are read instead",
    "PRECHECK_CONN": "the readiness probe reports an unreachable control plane",
    "TRUST_ALL_CERTIFICATES": "certificates are always verified; trust a private CA with ADDITIONAL_CERTS_PATH",
    "DESTINATION_CA_PATH": "Harness copies its CA bundle there for CI build pods, which this delegate does not "
    "start; ADDITIONAL_CERTS_PATH is the CA this delegate trusts",
}


@dataclass(frozen=True)
class EnvironmentReport:
    """Which environment variables set a setting, and which Harness variables were set for nothing."""

    #: (variable, setting key) for each variable that gave a setting its value.
    mapped: tuple[tuple[str, str], ...]
    #: (variable, why) for each Harness variable set that means nothing here.
    ignored: tuple[tuple[str, str], ...]

    def lines(self) -> list[str]:
        """What check-config prints: one line per mapping, one for everything ignored, one for INIT_SCRIPT."""
        lines = [f"{name} -> {key}" for name, key in self.mapped]
        plain = [name for name, _ in self.ignored if name != "INIT_SCRIPT"]
        if plain:
            lines.append(f"ignored, no meaning here: {', '.join(plain)}")
        if any(name == "INIT_SCRIPT" for name, _ in self.ignored):
            lines.append(f"INIT_SCRIPT is set but {HARNESS_UNUSED['INIT_SCRIPT']}")
        return lines


def environment_report(environ: Mapping[str, str]) -> EnvironmentReport:
    """What the environment sets, by the table's rules (the first name set wins), and what it sets in vain."""
    mapped = []
    for row in SETTINGS:
        name = next((n for n in row.env if environ.get(n, "").strip()), None)
        if name is not None:
            mapped.append((name, row.key))
    ignored = tuple((name, why) for name, why in HARNESS_UNUSED.items() if environ.get(name, "").strip())
    return EnvironmentReport(mapped=tuple(mapped), ignored=ignored)


# --- loading ---------------------------------------------------------------------------------------


def load_settings(environ: Mapping[str, str], config_file: Path | None = None) -> AgentSettings:
    """Read and check everything; raise :class:`ConfigError` listing every problem."""
    document: Mapping[str, Any] = {}
    problems: list[Problem] = []
    if config_file is not None:
        document, problems = _read_file(config_file)
    reader = _Reader(environ, document, str(config_file) if config_file else None, problems)
    values = {row.key: reader.read(row) for row in SETTINGS}
    problems.extend(_check_together(reader.given))
    problems.extend(_check_plaintext(values))
    if problems:
        raise ConfigError(problems)
    return _assemble(values)


def load_proxy_settings(environ: Mapping[str, str]) -> AgentSettings:
    """Only the proxy rows, from the environment (for ``validate``, which runs AWS calls but no delegate).

    The other fields keep their defaults and mean nothing here; raises :class:`ConfigError` for the
    proxy's problems alone.
    """
    problems: list[Problem] = []
    reader = _Reader(environ, {}, None, problems)
    rows = [row for row in SETTINGS if row.key.startswith("proxy.")]
    values = {row.attr: reader.read(row) for row in rows if isinstance(row.attr, str)}
    problems.extend(p for p in _check_together(reader.given) if p.field.startswith("PROXY_"))
    if problems:
        raise ConfigError(problems)
    given = {attr: value for attr, value in values.items() if value is not None}
    return AgentSettings(control_plane=ControlPlaneEndpoint(url="http://unused.invalid"), **given)


class _Reader:
    """Looks each setting up in the environment, then in the file, remembering where it came from."""

    def __init__(
        self, environ: Mapping[str, str], document: Mapping[str, Any], file_name: str | None, problems: list[Problem]
    ) -> None:
        self.environ = environ
        self.document = document
        self.file_name = file_name
        self.problems = problems
        #: Keys of the settings the user gave, valid or not (for the rules that span settings).
        self.given: set[str] = set()

    def read(self, row: Setting) -> Any:
        """The parsed value, the parsed default, or None (absent or invalid; invalid is a problem)."""
        found = self._find(row)
        if found is not None:
            raw, where = found
            self.given.add(row.key)
        else:
            if row.required:
                self.problems.append(Problem(field=row.env[0], message=row.required))
            raw = row.default() if callable(row.default) else row.default
            where = row.env[0]
        if raw is None:
            return None
        try:
            return row.parse(raw)
        except _Invalid as exc:
            self.problems.append(Problem(field=where, message=str(exc)))
            return None

    def _find(self, row: Setting) -> tuple[Any, str] | None:
        for name in row.env:
            value = self.environ.get(name)
            if value is not None and value.strip() != "":
                return value.strip(), name
        if not row.in_file:
            return None
        node: Any = self.document
        for part in row.key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        if node is None:
            return None
        return node, f"{self.file_name}: {row.key}" if self.file_name else row.key


def _check_together(given: set[str]) -> Iterator[Problem]:
    """The rules that span settings; the table checks each setting on its own."""
    tokens = {"delegate.token", "delegate.tokenFile"} & given
    if not tokens:
        yield Problem(
            field="DELEGATE_TOKEN", message="is required: set DELEGATE_TOKEN or DELEGATE_TOKEN_FILE (a mounted Secret)"
        )
    elif len(tokens) == 2:
        yield Problem(field="DELEGATE_TOKEN", message="give DELEGATE_TOKEN or DELEGATE_TOKEN_FILE, not both")
    if ("controlPlane.clientCertFile" in given) != ("controlPlane.clientKeyFile" in given):
        yield Problem(
            field="DELEGATE_CLIENT_CERTIFICATE_PATH",
            message="mutual TLS needs both the client certificate and its key: set both of "
            "DELEGATE_CLIENT_CERTIFICATE_PATH and DELEGATE_CLIENT_CERTIFICATE_KEY_PATH (or "
            "AGENT_CONTROL_PLANE_CLIENT_CERT_FILE and _KEY_FILE, or controlPlane.clientCertFile and clientKeyFile)",
        )
    if "proxy.host" in given and "proxy.port" not in given:
        yield Problem(field="PROXY_PORT", message="is required with PROXY_HOST")
    for key, name in (("proxy.port", "PROXY_PORT"), ("proxy.user", "PROXY_USER"), ("proxy.password", "PROXY_PASSWORD")):
        if key in given and "proxy.host" not in given:
            yield Problem(field=name, message="has no effect without PROXY_HOST")
    if "proxy.password" in given and "proxy.user" not in given:
        yield Problem(field="PROXY_PASSWORD", message="needs PROXY_USER")


def is_plaintext_remote(url: str) -> bool:
    """True for an http:// URL to another host; localhost, 127.0.0.0/8 and ::1 are this host."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it may resolve anywhere


def _check_plaintext(values: Mapping[str, Any]) -> Iterator[Problem]:
    """A plain-HTTP control plane on another host is refused unless AGENT_ALLOW_INSECURE says otherwise."""
    url = values["controlPlane.url"]
    if url and is_plaintext_remote(url) and not values["controlPlane.allowInsecure"]:
        where = urllib.parse.urlsplit(url).netloc.rpartition("@")[2]  # never a user:password in the message
        yield Problem(
            field="MANAGER_HOST_AND_PORT",
            message=f"http://{where} is plain HTTP to another host: the delegate token and each task's role ARN and "
            "External ID would cross the network unencrypted. Use https://, or set AGENT_ALLOW_INSECURE=true "
            "(controlPlane.allowInsecure) to accept that",
        )


def _assemble(values: Mapping[str, Any]) -> AgentSettings:
    """Put each row's value into the field(s) its ``attr`` names; absent values keep the field default."""
    endpoint: dict[str, Any] = {}
    top: dict[str, Any] = {}
    for row in SETTINGS:
        value = values[row.key]
        if value is None:
            continue
        parts = (value,) if len(row.attrs) == 1 else value
        for attr, part in zip(row.attrs, parts, strict=True):
            group, _, name = attr.rpartition(".")
            (endpoint if group == "control_plane" else top)[name] = part
    return AgentSettings(control_plane=ControlPlaneEndpoint(**endpoint), **top)


def _read_file(path: Path) -> tuple[Mapping[str, Any], list[Problem]]:
    problems: list[Problem] = []
    # A file that cannot be read, or read as a mapping, is the one problem worth saying: what it
    # holds is unknown, so "X is required" for settings it may well give would only be noise.
    try:
        text = read_text(path)
    except NotUtf8Text:
        raise ConfigError([Problem(field=str(path), message="is not UTF-8 text")]) from None
    except OSError as exc:
        raise ConfigError([Problem(field=str(path), message=f"cannot read the config file: {exc.strerror}")]) from None
    # Only a delegate given a config file parses YAML: the others do without the module (1 MiB).
    import yaml  # noqa: PLC0415

    from agent._yaml import load as load_yaml  # noqa: PLC0415

    try:
        doc = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(
            [Problem(field=str(path), message=f"is not valid YAML: {' '.join(str(exc).split())}")]
        ) from None
    except RecursionError:
        raise ConfigError([Problem(field=str(path), message="nests too deeply to be a config file")]) from None
    if doc is None:
        return {}, []
    if not isinstance(doc, Mapping):
        raise ConfigError([Problem(field=str(path), message="must be a mapping of settings")])
    for key, value in doc.items():
        if key not in _FILE_KEYS:
            problems.append(Problem(field=f"{path}: {clip(str(key))}", message="unknown setting"))
        elif _FILE_KEYS[key]:
            if value is None:
                continue  # a section whose every key is commented out: nothing set there
            if not isinstance(value, Mapping):
                problems.append(Problem(field=f"{path}: {key}", message="must be a mapping"))
                continue
            for sub in value:
                if sub not in _FILE_KEYS[key]:
                    problems.append(Problem(field=f"{path}: {key}.{clip(str(sub))}", message="unknown setting"))
    return doc, problems
