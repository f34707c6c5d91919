"""The delegate's settings: a YAML file plus environment variables, parsed once into frozen types.

Environment variables win over the file. The Harness delegate's names are accepted so its users
feel at home (``MANAGER_HOST_AND_PORT``, ``DELEGATE_TOKEN``, ``DELEGATE_NAME``, ``DELEGATE_TAGS``,
``DELEGATE_TASK_CAPACITY``). Every problem is collected and reported together; the caller prints
them and exits 2.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from agent._values import bounded_message, parse_bounded
from agent.observability.logging import LogFormat
from agent.protocol.auth import DEFAULT_AUDIENCE
from agent.protocol.models import Problem
from agent.protocol.patterns import DELEGATE_NAME_RE, TAG_RE
from agent.protocol.problems import ProblemsError


class ConfigError(ProblemsError):
    """The configuration has problems; all of them are in ``problems``."""


@dataclass(frozen=True)
class ControlPlaneEndpoint:
    """Where the delegate finds its control plane and how it talks to it (the server's own settings
    are ``agent.controlplane.core.ControlPlaneSettings``)."""

    #: Base URL of the control plane (``MANAGER_HOST_AND_PORT``).
    url: str
    #: JWT audience the control plane expects.
    audience: str = DEFAULT_AUDIENCE
    #: CA bundle to trust for an HTTPS control plane (default: the system's).
    ca_file: Path | None = None
    #: Client certificate and key for mutual TLS.
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    #: Budget for one request (long polls get their wait on top).
    request_timeout: float = 10.0
    #: Ed25519 public key (base64) the control plane signs tasks with; tasks without a valid
    #: signature are refused when set.
    task_public_key: str | None = None


@dataclass(frozen=True)
class AgentSettings:
    control_plane: ControlPlaneEndpoint
    #: The delegate token: a value (``DELEGATE_TOKEN``) or a file re-read on change (``DELEGATE_TOKEN_FILE``).
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    name: str = "delegate"
    tags: tuple[str, ...] = ()
    #: How many tasks run at once (``DELEGATE_TASK_CAPACITY``).
    capacity: int = 16
    http_host: str = "0.0.0.0"  # noqa: S104 - probes and Prometheus reach the pod on its IP
    http_port: int = 3460
    #: Where the result outbox lives; None keeps it in memory (said at startup).
    data_dir: Path | None = None
    #: Where connector secret references resolve (a mounted Kubernetes Secret).
    secrets_dir: Path | None = None
    log_format: LogFormat | None = None
    log_level: str = "info"
    #: How long a SIGTERM waits for running tasks; fits a 30 s grace period with room to report.
    drain_timeout: float = 20.0
    #: Extra time after the drain for cancelling, flushing and deregistering before a hard exit.
    shutdown_grace: float = 8.0
    #: Per-call AWS socket timeouts; the CLI puts them into the AWS environment its handler uses
    #: (the runtime knows nothing of AWS).
    aws_connect_timeout: float = 5.0
    aws_read_timeout: float = 10.0

    @property
    def http_listen(self) -> str:
        return f"{self.http_host}:{self.http_port}"

    def describe(self) -> dict[str, Any]:
        """The effective settings for ``check-config`` and the startup log (no secrets)."""
        return {
            "controlPlane": self.control_plane.url,
            "audience": self.control_plane.audience,
            "controlPlaneCa": str(self.control_plane.ca_file) if self.control_plane.ca_file else None,
            "mutualTls": self.control_plane.client_cert_file is not None,
            "signedTasks": "required" if self.control_plane.task_public_key else "not checked",
            "tokenSource": f"file {self.token_file}" if self.token_file else "DELEGATE_TOKEN (environment)",
            "name": self.name,
            "tags": list(self.tags),
            "capacity": self.capacity,
            "http": self.http_listen,
            "dataDir": str(self.data_dir) if self.data_dir else None,
            "secretsDir": str(self.secrets_dir) if self.secrets_dir else None,
            "logFormat": self.log_format or "auto",
            "logLevel": self.log_level,
            "drainTimeoutSeconds": self.drain_timeout,
        }


# Where each setting can come from: (file path, environment variables in order of preference).
_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "url": ("controlPlane.url", ("MANAGER_HOST_AND_PORT", "AGENT_CONTROL_PLANE_URL")),
    "audience": ("controlPlane.audience", ("AGENT_CONTROL_PLANE_AUDIENCE",)),
    "ca_file": ("controlPlane.caFile", ("AGENT_CONTROL_PLANE_CA_FILE",)),
    "client_cert_file": ("controlPlane.clientCertFile", ("AGENT_CONTROL_PLANE_CLIENT_CERT_FILE",)),
    "client_key_file": ("controlPlane.clientKeyFile", ("AGENT_CONTROL_PLANE_CLIENT_KEY_FILE",)),
    "request_timeout": ("controlPlane.requestTimeoutSeconds", ("AGENT_CONTROL_PLANE_TIMEOUT_SECONDS",)),
    "task_public_key": ("controlPlane.taskPublicKey", ("AGENT_TASK_PUBLIC_KEY",)),
    "token_file": ("delegate.tokenFile", ("DELEGATE_TOKEN_FILE",)),
    "name": ("delegate.name", ("DELEGATE_NAME",)),
    "tags": ("delegate.tags", ("DELEGATE_TAGS",)),
    "capacity": ("delegate.capacity", ("DELEGATE_TASK_CAPACITY",)),
    "listen": ("http.listen", ("AGENT_HTTP_LISTEN",)),
    "data_dir": ("dataDir", ("AGENT_DATA_DIR",)),
    "secrets_dir": ("secretsDir", ("AGENT_SECRETS_DIR",)),
    "log_format": ("logging.format", ("AGENT_LOG_FORMAT",)),
    "log_level": ("logging.level", ("AGENT_LOG_LEVEL", "LOGGING_LEVEL")),
    "drain_timeout": ("shutdown.drainTimeoutSeconds", ("AGENT_DRAIN_TIMEOUT_SECONDS",)),
    "shutdown_grace": ("shutdown.graceSeconds", ("AGENT_SHUTDOWN_GRACE_SECONDS",)),
    "connect_timeout": ("aws.connectTimeoutSeconds", ("AGENT_AWS_CONNECT_TIMEOUT_SECONDS",)),
    "read_timeout": ("aws.readTimeoutSeconds", ("AGENT_AWS_READ_TIMEOUT_SECONDS",)),
}
_FILE_KEYS = {
    "controlPlane": {
        "url",
        "audience",
        "caFile",
        "clientCertFile",
        "clientKeyFile",
        "requestTimeoutSeconds",
        "taskPublicKey",
    },
    "delegate": {"name", "tags", "capacity", "tokenFile"},
    "http": {"listen"},
    "logging": {"format", "level"},
    "shutdown": {"drainTimeoutSeconds", "graceSeconds"},
    "aws": {"connectTimeoutSeconds", "readTimeoutSeconds"},
    "dataDir": set(),
    "secretsDir": set(),
}


class _Reader:
    """Looks each setting up in the environment, then in the file, remembering where it came from."""

    def __init__(self, environ: Mapping[str, str], document: Mapping[str, Any], file_name: str | None) -> None:
        self.environ = environ
        self.document = document
        self.file_name = file_name
        self.problems: list[Problem] = []

    def get(self, key: str) -> tuple[Any, str] | None:
        path, names = _SOURCES[key]
        for name in names:
            value = self.environ.get(name)
            if value is not None and value.strip() != "":
                return value.strip(), name
        node: Any = self.document
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        if node is None:
            return None
        return node, f"{self.file_name}: {path}" if self.file_name else path

    def add(self, where: str, message: str) -> None:
        self.problems.append(Problem(field=where, message=message))

    def text(self, key: str, default: str | None = None) -> tuple[str | None, str]:
        found = self.get(key)
        if found is None:
            return default, _SOURCES[key][1][0]
        value, where = found
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            self.add(where, f"must be text, not {type(value).__name__}")
            return default, where
        return str(value), where

    def number(self, key: str, default: float, lo: float, hi: float, *, integer: bool = False) -> float:
        found = self.get(key)
        if found is None:
            return default
        value, where = found
        if isinstance(value, bool):
            self.add(where, bounded_message(str(value), lo, hi, integer=integer))
            return default
        parsed = parse_bounded(str(value), lo, hi, integer=integer)
        if parsed is None:
            self.add(where, bounded_message(str(value), lo, hi, integer=integer))
            return default
        return parsed

    def path(self, key: str, *, must_exist: Literal["file", "dir", None] = None) -> Path | None:
        text, where = self.text(key)
        if text is None:
            return None
        path = Path(text).expanduser()
        if must_exist == "file" and not path.is_file():
            self.add(where, f"{path} does not exist or is not a file")
        if must_exist == "dir" and not path.is_dir():
            self.add(where, f"{path} does not exist or is not a directory")
        return path


def load_settings(environ: Mapping[str, str], config_file: Path | None = None) -> AgentSettings:
    """Read and check everything; raise :class:`ConfigError` listing every problem."""
    document: Mapping[str, Any] = {}
    problems: list[Problem] = []
    if config_file is not None:
        document, problems = _read_file(config_file)
    r = _Reader(environ, document, str(config_file) if config_file else None)
    r.problems.extend(problems)

    url, url_where = r.text("url")
    if url is None:
        r.add("MANAGER_HOST_AND_PORT", "is required: the control plane's URL (e.g. https://control-plane:8080)")
    else:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            r.add(url_where, f"must be an http(s) URL with a host, not {url!r}")

    token = environ.get("DELEGATE_TOKEN") or None
    token_file = r.path("token_file", must_exist="file")
    if token is None and token_file is None:
        r.add("DELEGATE_TOKEN", "is required: set DELEGATE_TOKEN or DELEGATE_TOKEN_FILE (a mounted Secret)")
    elif token is not None and token_file is not None:
        r.add("DELEGATE_TOKEN", "give DELEGATE_TOKEN or DELEGATE_TOKEN_FILE, not both")
    elif token_file is not None and token_file.is_file() and not token_file.read_text().strip():
        r.add("DELEGATE_TOKEN_FILE", f"{token_file} is empty")

    name, name_where = r.text("name", default=socket.gethostname())
    if name is None or not DELEGATE_NAME_RE.match(name):
        r.add(name_where, f"{name!r} must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter or digit)")
    tags = _tags(r)
    capacity = int(r.number("capacity", 16, 1, 1024, integer=True))

    listen, listen_where = r.text("listen", default="0.0.0.0:3460")
    host, port = "0.0.0.0", 3460  # noqa: S104
    if listen is not None:
        h, sep, p = listen.rpartition(":")
        if not sep or parse_bounded(p, 0, 65535, integer=True) is None:
            r.add(listen_where, f"must be HOST:PORT, not {listen!r}")
        else:
            host, port = h.strip("[]") or "0.0.0.0", int(p)  # noqa: S104

    data_dir = r.path("data_dir")
    if data_dir is not None and (problem := _unwritable(data_dir)):
        r.add("AGENT_DATA_DIR", problem)
    secrets_dir = r.path("secrets_dir", must_exist="dir")

    log_format, fmt_where = r.text("log_format")
    if log_format is not None and log_format not in ("json", "console"):
        r.add(fmt_where, f"must be json or console, not {log_format!r}")
        log_format = None
    level, level_where = r.text("log_level", default="info")
    if level is None or level.lower() not in ("debug", "info", "warning", "warn", "error", "critical", "trace", "off"):
        r.add(level_where, f"must be debug, info, warning or error, not {level!r}")
        level = "info"
    level = {"trace": "debug", "warn": "warning", "off": "critical"}.get(level.lower(), level.lower())

    ca_file = r.path("ca_file", must_exist="file")
    cert = r.path("client_cert_file", must_exist="file")
    key = r.path("client_key_file", must_exist="file")
    if (cert is None) != (key is None):
        r.add("AGENT_CONTROL_PLANE_CLIENT_CERT_FILE", "mutual TLS needs both the client certificate and its key")
    public_key, _ = r.text("task_public_key")

    aws_connect_timeout = r.number("connect_timeout", 5.0, 0.1, 120)
    aws_read_timeout = r.number("read_timeout", 10.0, 0.1, 300)
    audience, _ = r.text("audience", default=DEFAULT_AUDIENCE)

    settings_values = {
        "drain_timeout": r.number("drain_timeout", 20.0, 0, 3600),
        "shutdown_grace": r.number("shutdown_grace", 8.0, 1, 600),
        "request_timeout": r.number("request_timeout", 10.0, 0.5, 300),
    }
    if r.problems:
        raise ConfigError(r.problems)
    assert url is not None and name is not None
    return AgentSettings(
        control_plane=ControlPlaneEndpoint(
            url=url.rstrip("/"),
            audience=audience or DEFAULT_AUDIENCE,
            ca_file=ca_file,
            client_cert_file=cert,
            client_key_file=key,
            request_timeout=settings_values["request_timeout"],
            task_public_key=public_key,
        ),
        token=token,
        token_file=token_file,
        name=name,
        tags=tags,
        capacity=capacity,
        http_host=host,
        http_port=port,
        data_dir=data_dir,
        secrets_dir=secrets_dir,
        log_format=log_format,  # type: ignore[arg-type]
        log_level=level,
        drain_timeout=settings_values["drain_timeout"],
        shutdown_grace=settings_values["shutdown_grace"],
        aws_connect_timeout=aws_connect_timeout,
        aws_read_timeout=aws_read_timeout,
    )


def _unwritable(path: Path) -> str | None:
    """Why the delegate could not create or write the directory ``path``, judged without writing.

    Parsing settings leaves the disk alone (``check-config`` must not create directories); the
    outbox creates the data dir when it opens it.
    """
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    blocked = "" if existing == path else f"cannot create {path}: "
    if not existing.is_dir():
        return f"{blocked}{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{blocked}{existing} is not writable by this user"
    return None


def _read_file(path: Path) -> tuple[Mapping[str, Any], list[Problem]]:
    problems: list[Problem] = []
    try:
        text = path.read_text()
    except OSError as exc:
        return {}, [Problem(field=str(path), message=f"cannot read the config file: {exc.strerror}")]
    try:
        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    except yaml.YAMLError as exc:
        return {}, [Problem(field=str(path), message=f"is not valid YAML: {' '.join(str(exc).split())}")]
    if doc is None:
        return {}, []
    if not isinstance(doc, Mapping):
        return {}, [Problem(field=str(path), message="must be a mapping of settings")]
    for key, value in doc.items():
        if key not in _FILE_KEYS:
            problems.append(Problem(field=f"{path}: {key}", message="unknown setting"))
        elif _FILE_KEYS[key]:
            if not isinstance(value, Mapping):
                problems.append(Problem(field=f"{path}: {key}", message="must be a mapping"))
                continue
            for sub in value:
                if sub not in _FILE_KEYS[key]:
                    problems.append(Problem(field=f"{path}: {key}.{sub}", message="unknown setting"))
    return doc, problems


def _tags(r: _Reader) -> tuple[str, ...]:
    found = r.get("tags")
    if found is None:
        return ()
    value, where = found
    if isinstance(value, str):
        items = [t for t in re.split(r"\s*,+\s*", value.strip()) if t]  # as Harness parses DELEGATE_TAGS
    elif isinstance(value, list) and all(isinstance(t, str) for t in value):
        items = [t.strip() for t in value]
    else:
        r.add(where, "must be a list of tags or a comma-separated string")
        return ()
    bad = [t for t in items if not TAG_RE.match(t)]
    if bad:
        r.add(where, f"a tag has letters, digits and _.:/=+@- (starting with a letter or digit): {bad}")
    return tuple(dict.fromkeys(t for t in items if TAG_RE.match(t)))
