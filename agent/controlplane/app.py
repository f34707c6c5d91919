"""The reference control plane as a service: wiring, credentials, HTTP server, lifecycle.

``ControlPlaneService`` is what the CLI, the demo and the tests start. It owns the store (SQLite in
the data dir, or Postgres from a URL), the :class:`ControlPlane` core, the token verifier and the
aiohttp runner, and stops them in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from agent._files import (
    DataDirLock,
    DataDirUnusable,
    NotUtf8Text,
    lost_state_file,
    make_data_dir,
    mark_state_file,
    read_text,
)
from agent.controlplane.console import Console
from agent.controlplane.core import ControlPlane, ControlPlaneSettings, PlatformValidator, TaskSigner
from agent.controlplane.health import StatusChange
from agent.controlplane.oidc import (
    DEFAULT_KEY_DAYS,
    JWKS_MAX_AGE_SECONDS,
    OidcConfigError,
    OidcIssuer,
    TaskTokens,
)
from agent.controlplane.openapi import build_openapi
from agent.controlplane.routes import (
    MAX_BODY_BYTES,
    ROUTES,
    Handlers,
    bind,
    error_middleware,
    json_response,
    metrics_middleware,
)
from agent.controlplane.store import SchemaTooNew, Store, StoreUnavailable, open_store
from agent.controlplane.tokens import ScopeInvalid, TokenScope, parse_scope_options
from agent.controlplane.webhook import StatusWebhook, status_change_event
from agent.observability.http import ConnectionLimits, LimitedSite
from agent.protocol.auth import Clock, IssuedToken, TokenKey, TokenVerifier, generate_token, token_id
from agent.protocol.patterns import TOKEN_NAME_RE
from agent.protocol.signing import TaskSigningKey

log = structlog.get_logger("controlplane")


class CredentialsError(Exception):
    """The delegate tokens or API keys cannot be loaded; the message says which and why."""


@dataclass(frozen=True)
class ControlPlaneConfig:
    """Everything ``delegate-agent control-plane`` takes from its flags and environment."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path | None = None
    #: A Postgres URL (``postgresql://...``): the store several replicas share instead of SQLite in the data dir.
    database_url: str | None = field(default=None, repr=False)
    #: A direct (session-mode) Postgres URL for LISTEN, when ``database_url`` goes through PgBouncer.
    database_listen_url: str | None = field(default=None, repr=False)
    #: With Postgres, a waiting long poll looks at the queue at least this often, whatever wakeups it heard.
    database_poll_seconds: float = 1.0
    #: Where to POST each connector status change (it may carry a token: never logged).
    status_webhook_url: str | None = field(default=None, repr=False)
    #: Be an OIDC identity provider at this (checked) URL: OidcAuthentication connectors get tokens.
    oidc_issuer: str | None = None
    #: The OIDC signing keys; default ``oidc-keys.json`` in the data dir (required with a database).
    oidc_key_file: Path | None = None
    #: In the data dir, rotate the signing key when it is this many days old.
    oidc_key_days: float = DEFAULT_KEY_DAYS
    delegate_token_file: Path | None = None
    #: ``CONTROL_PLANE_DELEGATE_TOKENS``: comma-separated tokens, each ``name:token`` or ``token``.
    delegate_tokens: str | None = field(default=None, repr=False)
    api_key_file: Path | None = None
    api_key: str | None = field(default=None, repr=False)
    secrets_dir: Path | None = None
    #: Ed25519 seed (base64) the control plane signs tasks with; generated into the data dir if absent.
    task_signing_key_file: Path | None = None
    #: HTTPS: certificate and key; with a client CA, delegates must present a certificate (mTLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    #: Header and keep-alive timeouts and the open-connection cap (--header-timeout-seconds...).
    limits: ConnectionLimits = field(default_factory=lambda: ConnectionLimits(max_connections=512))
    settings: ControlPlaneSettings = field(default_factory=ControlPlaneSettings)


@dataclass(frozen=True)
class TokenFile:
    """The delegate tokens of a token file (or the environment), and the scope of each name."""

    keys: list[TokenKey]
    scopes: dict[str, TokenScope] = field(default_factory=dict)


def parse_token_lines(text: str, source: str) -> TokenFile:
    """Delegate tokens, one per line: ``name:token`` or a bare token, then optionally its scope.

    ``team-a:TOKEN names=team-a-* tags=eks|prod`` limits the token to delegate names matching
    ``team-a-*`` and tags from ``eks``, ``prod`` (see :mod:`agent.controlplane.tokens`). ``#``
    starts a comment. One name may have several tokens (rotation); they must share a scope.
    """
    keys: list[TokenKey] = []
    scopes: dict[str, TokenScope] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        if not sep or any(c.isspace() for c in name.strip()):
            name, rest = "", line
        secret, *options = rest.split() or [""]
        name = name.strip()
        if name and not TOKEN_NAME_RE.match(name):
            raise CredentialsError(f"{source}, line {number}: token names use letters, digits, '_', '.', '-'")
        if len(secret) < 16:
            raise CredentialsError(f"{source}, line {number}: a delegate token needs at least 16 characters")
        try:
            scope = parse_scope_options(options)
        except ScopeInvalid as exc:
            raise CredentialsError(f"{source}, line {number}: {exc}") from None
        key = TokenKey(name=name or f"token-{token_id(secret)[:8]}", secret=secret)
        if scopes.setdefault(key.name, scope) != scope:
            raise CredentialsError(
                f"{source}, line {number}: token {key.name!r} is listed before with another scope; "
                "tokens sharing a name share its scope"
            )
        keys.append(key)
    return TokenFile(keys=keys, scopes=scopes)


#: The data dir holds the database and generated credentials: its owner's alone.
DATA_DIR_MODE = 0o700


def _make_private_dir(path: Path, existed: bool) -> int | None:
    """Narrow the data dir to 0700; returns the looser mode an existing one had (for a warning), else None.

    Tightening (rather than refusing) keeps an existing deployment starting, and the caller warns
    once the data dir proved usable. A directory this user cannot chmod is refused: its files would
    stay readable by others.
    """
    mode = path.stat().st_mode & 0o777
    if mode == DATA_DIR_MODE or (existed and not mode & 0o077):
        return None
    try:
        path.chmod(DATA_DIR_MODE)
    except OSError as exc:
        raise DataDirUnusable(
            f"cannot use the data dir {path} (--data-dir): it is mode {mode:04o} and cannot be narrowed "
            f"to 0700 ({exc.strerror}); chmod 700 it"
        ) from None
    return mode if existed else None


def _log_tightened(path: Path, mode: int) -> None:
    log.warning(
        "controlplane.data_dir_tightened",
        path=str(path),
        was=f"{mode:04o}",
        now="0700",
        hint="the data dir holds the database and credentials; it is now readable by its owner only",
    )


def _read_private(path: Path, what: str) -> str:
    try:
        return read_text(path)
    except NotUtf8Text as exc:
        raise CredentialsError(str(exc)) from None
    except OSError as exc:
        raise CredentialsError(f"cannot read the {what} file {path}: {exc.strerror}") from None


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@dataclass
class Credentials:
    tokens: list[TokenKey]
    api_keys: list[str] = field(repr=False)
    generated: list[Path]
    #: The scope of each configured token name (names absent here may register anything).
    scopes: dict[str, TokenScope] = field(default_factory=dict)


def load_credentials(config: ControlPlaneConfig) -> Credentials:
    """Delegate tokens and API keys from files or environment; generated into the data dir if absent."""
    generated: list[Path] = []
    if config.delegate_token_file is not None:
        parsed = parse_token_lines(
            _read_private(config.delegate_token_file, "delegate token"), str(config.delegate_token_file)
        )
    elif config.delegate_tokens:
        parsed = parse_token_lines(config.delegate_tokens.replace(",", "\n"), "CONTROL_PLANE_DELEGATE_TOKENS")
    else:
        parsed = TokenFile(keys=_generated_tokens(config, generated))
    tokens = parsed.keys
    if not tokens:
        raise CredentialsError("no delegate token configured: the token file is empty")

    if config.api_key_file is not None:
        api_keys = [k.strip() for k in _read_private(config.api_key_file, "API key").splitlines() if k.strip()]
    elif config.api_key:
        api_keys = [config.api_key.strip()]
    else:
        api_keys = [_generated_secret(config, "api-key", generated)]
    if not api_keys:
        raise CredentialsError("no API key configured: the API key file is empty")
    return Credentials(tokens=tokens, api_keys=api_keys, generated=generated, scopes=parsed.scopes)


def load_signing_key(config: ControlPlaneConfig, generated: list[Path]) -> TaskSigningKey:
    """The task signing key from its file, or generated into the data dir (with the public key beside it)."""
    if config.task_signing_key_file is not None:
        try:
            return TaskSigningKey(_read_private(config.task_signing_key_file, "task signing key"))
        except ValueError as exc:
            raise CredentialsError(f"{config.task_signing_key_file}: {exc}") from None
    if config.data_dir is None:
        return TaskSigningKey.generate()
    path = config.data_dir / "task-signing-key"
    if path.exists():
        try:
            return TaskSigningKey(_read_private(path, "task signing key"))
        except ValueError as exc:
            raise CredentialsError(f"{path}: {exc}") from None
    key = TaskSigningKey.generate()
    _write_private(path, key.seed_b64 + "\n")
    (config.data_dir / "task-signing-key.pub").write_text(key.public_key_b64 + "\n")
    generated.append(path)
    return key


def _require_shared_credentials(config: ControlPlaneConfig) -> None:
    """With a shared database every replica must hold the same credentials: given, never generated."""
    missing = []
    if config.delegate_token_file is None and not config.delegate_tokens:
        missing.append("delegate tokens (--delegate-token-file or CONTROL_PLANE_DELEGATE_TOKENS)")
    if config.api_key_file is None and not config.api_key:
        missing.append("API keys (--api-key-file or CONTROL_PLANE_API_KEY)")
    if config.task_signing_key_file is None:
        missing.append("the task signing key (--task-signing-key-file)")
    if config.oidc_issuer is not None and config.oidc_key_file is None:
        missing.append("the OIDC keys (--oidc-key-file)")
    if missing:
        raise CredentialsError(
            "with --database every replica must use the same credentials, so they are not generated: give "
            + "; ".join(missing)
        )


def _generated_tokens(config: ControlPlaneConfig, generated: list[Path]) -> list[TokenKey]:
    secret = _generated_secret(config, "delegate-token", generated)
    return [TokenKey(name="default", secret=secret)]


def _generated_secret(config: ControlPlaneConfig, name: str, generated: list[Path]) -> str:
    if config.data_dir is None:
        raise CredentialsError(f"no {name.replace('-', ' ')} given and no --data-dir to generate one into")
    path = config.data_dir / name
    if path.exists():
        value = _read_private(path, name).strip()
        if value:
            return value
    value = generate_token()
    _write_private(path, value + "\n")
    generated.append(path)
    return value


class ControlPlaneService:
    """The control plane as one owner: construct (no I/O), :meth:`setup`, :meth:`start`, :meth:`shutdown`.

    :meth:`setup` loads the credentials (generating them into the data dir if none are given) and
    opens the store; :meth:`start` binds the port and starts the sweeper. Each resource's close is
    entered into one ``AsyncExitStack`` as it is opened, so :meth:`shutdown` closes them in
    reverse order (token watcher, core, HTTP server, platform validator, store) and one failing
    close does not stop the others. ``async with`` starts and shuts down; a service starts once.
    """

    def __init__(
        self,
        config: ControlPlaneConfig,
        *,
        platform_validator: PlatformValidator | None = None,
        task_signer: TaskSigner | None = None,
        task_public_key: str | None = None,
        clock: Clock | None = None,
        on_secret: Callable[[str], None] | None = None,
    ) -> None:
        """``on_secret`` is told every token and API key the service reads (the redactor's ``add``)."""
        self.config = config
        self._on_secret = on_secret
        self._platform_validator = platform_validator
        self._task_signer = task_signer
        self.task_public_key = task_public_key
        self._clock = clock
        self._stack = contextlib.AsyncExitStack()
        self._parts: _Parts | None = None
        self._started = False
        self._closed = False
        self.signing_key: TaskSigningKey | None = None
        #: The OIDC issuer, once set up, when ``oidc_issuer`` is configured.
        self.oidc: OidcIssuer | None = None
        self.url = ""

    # The parts exist once set up; reading one before that is a bug, said plainly.
    @property
    def credentials(self) -> Credentials:
        return self._ready().credentials

    @property
    def store(self) -> Store:
        return self._ready().store

    @property
    def core(self) -> ControlPlane:
        return self._ready().core

    @property
    def verifier(self) -> TokenVerifier:
        return self._ready().verifier

    @property
    def handlers(self) -> Handlers:
        return self._ready().handlers

    @property
    def app(self) -> web.Application:
        return self._ready().app

    @property
    def api_key(self) -> str:
        return self.credentials.api_keys[0]

    def _ready(self) -> _Parts:
        if self._parts is None:
            raise RuntimeError("the control plane is not set up: call setup() or start() first")
        return self._parts

    async def setup(self) -> None:
        """Load credentials and open the store (idempotent).

        Raises CredentialsError for bad credentials, DataDirUnusable for a data dir it cannot write.
        """
        if self._parts is not None:
            return
        if self._closed:
            raise RuntimeError("this control plane was shut down; make a new one")
        config = self.config
        if self._platform_validator is not None:
            self._stack.push_async_callback(self._platform_validator.aclose)
        shared = config.database_url is not None
        if shared:
            _require_shared_credentials(config)
        loosened = None
        db_path = None
        if config.data_dir is not None:
            existed = config.data_dir.exists()
            make_data_dir(config.data_dir, "--data-dir")
            loosened = _make_private_dir(config.data_dir, existed)
            if not shared:
                # One owner per data dir: a second control plane here would rewrite the first one's tasks.
                lock = DataDirLock.acquire(config.data_dir, "--data-dir")
                self._stack.callback(lock.release)
                db_path = config.data_dir / DATABASE_FILE
                if lost_state_file(db_path):
                    log.warning(
                        "controlplane.database_missing",
                        path=str(db_path),
                        hint="this data dir was used before, but its database is missing or empty: starting with "
                        "none (connectors, tasks and created tokens are gone); restore a backup if that is wrong",
                    )
        try:
            # Credentials may be generated into the data dir, the store and signing key live there:
            # any of them failing to write is the data dir's fault, said in one line.
            creds = load_credentials(config)
            self._remember(*(k.secret for k in creds.tokens), *creds.api_keys)
            self.oidc = self._load_oidc(creds.generated)
            store = await self._open_store(db_path)
            if db_path is not None:
                mark_state_file(db_path)
            task_signer = self._task_signer
            if task_signer is None:
                self.signing_key = load_signing_key(config, creds.generated)
                task_signer, self.task_public_key = self.signing_key.sign, self.signing_key.public_key_b64
        except StoreUnavailable as exc:
            raise DataDirUnusable(f"cannot use the data dir {config.data_dir} (--data-dir): {exc}") from None
        except (OSError, sqlite3.Error) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise DataDirUnusable(f"cannot use the data dir {config.data_dir} (--data-dir): {reason}") from None
        if config.data_dir is not None and loosened is not None:
            _log_tightened(config.data_dir, loosened)
        kwargs: dict[str, Any] = {
            "platform_validator": self._platform_validator,
            "task_signer": task_signer,
            "task_tokens": TaskTokens(self.oidc),
        }
        if self._clock is not None:
            kwargs["clock"] = self._clock
        core = ControlPlane(store, config.settings, **kwargs)
        try:
            await core.recover()  # writes: a full disk or an unreachable database stops it here
            verifier = TokenVerifier(
                creds.tokens,
                audience=config.settings.audience,
                leeway=config.settings.clock_leeway_seconds,
                revoked=await store.revoked_tokens(),
                issued=[IssuedToken(name, kid, key) for name, kid, key, _ in await store.issued_tokens()],
            )
            issued_scopes = await store.issued_token_scopes()
        except StoreUnavailable as exc:
            where = "the database" if shared else f"the data dir {config.data_dir} (--data-dir)"
            raise DataDirUnusable(f"cannot start on {where}: {exc}") from None
        handlers = Handlers(
            core,
            verifier,
            creds.api_keys,
            build_openapi(),
            task_public_key=self.task_public_key,
            scopes=creds.scopes,
            issued_scopes=issued_scopes,
        )
        handlers.oidc = self.oidc
        self._token_stamp = self._stamp()
        self._parts = _Parts(
            credentials=creds, store=store, core=core, verifier=verifier, handlers=handlers, app=make_app(handlers)
        )

    async def start(self) -> str:
        """Set up if needed, bind the port, start the sweeper; returns the URL. A service starts once."""
        if self._started:
            raise RuntimeError("this control plane has already been started")
        ssl_context = self._tls_context()  # first: a certificate it cannot use stops it before anything is written
        self._started = True
        await self.setup()
        for path in self.credentials.generated:
            _log_generated(path)
        # handler_cancellation: a long poll whose delegate hung up is cancelled, so no dead waiter
        # can swallow the wakeup meant for a live one.
        runner = web.AppRunner(
            make_app(self.handlers),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=2.0,
            handler_cancellation=True,
            keepalive_timeout=self.config.limits.keepalive_timeout,
        )
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        site = LimitedSite(
            runner,
            self.config.host,
            self.config.port,
            self.config.limits,
            ssl_context=ssl_context,
            metrics=(self.core.metrics.registry, "controlplane_http"),
        )
        await site.start()
        host, port = runner.addresses[0][0], runner.addresses[0][1]
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"
        if self.config.status_webhook_url:
            # Started before the core and closed after it: a status change found while stopping is sent.
            webhook = StatusWebhook(self.config.status_webhook_url)
            await webhook.start()
            self._stack.push_async_callback(webhook.aclose)
            self.core.health.on_change = lambda change: webhook.notify(_event(change, self.url))
        await self.core.start()
        self._stack.push_async_callback(self.core.stop)
        if self.config.delegate_token_file is not None:
            watch = asyncio.create_task(self._watch_tokens(), name="controlplane-token-watch")
            self._stack.push_async_callback(_cancel, watch)
        if self.store.shared:
            follow = asyncio.create_task(self._follow_tokens(), name="controlplane-token-follow")
            self._stack.push_async_callback(_cancel, follow)
        log.info(
            "controlplane.started",
            task_public_key=self.task_public_key,
            mutual_tls=self.config.tls_client_ca_file is not None,
            url=self.url,
            console=f"{self.url}/console/",
            store=self.store.kind,
            data_dir=None if self.store.shared else str(self.config.data_dir or "(memory)"),
            token_names=[k.name for k in self.verifier.keys],
        )
        return self.url

    async def shutdown(self) -> None:
        """Close everything opened, in reverse order. Safe to call twice, or before start."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._stack.aclose()
        except Exception:
            # Every other close has run; one that failed is worth a line, not a traceback at exit.
            log.exception("controlplane.close_failed")
        if self._started:
            log.info("controlplane.stopped")

    #: The name callers used before :meth:`shutdown`; the same thing.
    stop = shutdown

    async def __aenter__(self) -> ControlPlaneService:
        try:
            await self.start()
        except BaseException:
            await self.shutdown()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    def _tls_context(self) -> ssl.SSLContext | None:
        c = self.config
        if c.tls_cert_file is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(c.tls_cert_file, c.tls_key_file)
        except OSError as exc:  # ssl.SSLError is one: not PEM, key does not match
            key = c.tls_key_file or "the same file"
            raise CredentialsError(
                f"cannot use the TLS certificate {c.tls_cert_file} with the key in {key}: {exc.strerror or exc}"
            ) from None
        if c.tls_client_ca_file is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                ctx.load_verify_locations(c.tls_client_ca_file)
            except OSError as exc:
                raise CredentialsError(
                    f"cannot use the client CA {c.tls_client_ca_file}: {exc.strerror or exc}"
                ) from None
        return ctx

    def _load_oidc(self, generated: list[Path]) -> OidcIssuer | None:
        """The OIDC issuer when configured, its keys loaded (generated into the data dir on first start)."""
        c = self.config
        if c.oidc_issuer is None:
            return None
        key_file = c.oidc_key_file
        if key_file is None and c.data_dir is not None:
            key_file = c.data_dir / OIDC_KEY_FILE
        try:
            issuer = OidcIssuer(c.oidc_issuer, key_file, writable=c.database_url is None, key_days=c.oidc_key_days)
            generated += issuer.load()
        except OidcConfigError as exc:
            raise CredentialsError(str(exc)) from None
        return issuer

    def _stamp(self) -> tuple[int, int] | None:
        path = self.config.delegate_token_file
        if path is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def _open_store(self, db_path: Path | None) -> Store:
        """The store: Postgres when a URL was given, else SQLite in the data dir (or in memory)."""
        url = self.config.database_url
        try:
            store = await open_store(
                url if url is not None else db_path,
                listen_url=self.config.database_listen_url,
                poll_backstop=self.config.database_poll_seconds,
            )
        except SchemaTooNew as exc:
            raise DataDirUnusable(str(exc)) from None
        except StoreUnavailable as exc:
            if url is None:
                raise
            raise DataDirUnusable(f"cannot use the database (--database): {exc}") from None
        except ValueError as exc:  # a URL asyncpg cannot read (its message is masked by the store)
            raise DataDirUnusable(f"cannot use the database (--database): {exc}") from None
        self._stack.push_async_callback(store.close)
        return store

    def reload_tokens(self) -> bool:
        """Re-read the delegate token file (rotation without a restart). True when it changed."""
        if self.config.delegate_token_file is None:
            return False
        stamp = self._stamp()
        if stamp == self._token_stamp:
            return False
        self._token_stamp = stamp
        try:
            parsed = parse_token_lines(
                _read_private(self.config.delegate_token_file, "delegate token"), str(self.config.delegate_token_file)
            )
        except CredentialsError as exc:
            log.error("controlplane.token_reload_failed", error=str(exc), hint="keeping the previous tokens")
            return False
        keys = parsed.keys
        self._remember(*(k.secret for k in keys))  # first: a later line about them must not show one
        if not keys:
            log.error(
                "controlplane.token_reload_failed", error="the token file is empty", hint="keeping the previous tokens"
            )
            return False
        self.verifier.replace_keys(keys)
        self.handlers.scopes = parsed.scopes
        log.info("controlplane.tokens_reloaded", token_names=[k.name for k in keys])
        return True

    def _remember(self, *secrets: str) -> None:
        if self._on_secret is not None:
            for secret in secrets:
                self._on_secret(secret)

    async def _watch_tokens(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            self.reload_tokens()

    async def sync_tokens(self) -> None:
        """Adopt the tokens other replicas created or revoked (they are in the shared store)."""
        verifier = self.verifier
        known = {k.kid for k in verifier.issued}
        scopes = await self.store.issued_token_scopes()
        for name, kid, key, _ in await self.store.issued_tokens():
            if kid not in known:
                verifier.add_issued(IssuedToken(name, kid, key))
                self.handlers.adopt_issued(kid, TokenScope(*scopes.get(kid, (None, None))))
        for kid in await self.store.revoked_tokens():
            verifier.revoke(kid)

    async def _follow_tokens(self) -> None:
        """With several replicas, a token created or revoked on one counts on all within seconds."""
        while True:
            await asyncio.sleep(TOKEN_FOLLOW_SECONDS)
            with contextlib.suppress(StoreUnavailable):  # the store's fault is reported by readiness
                await self.sync_tokens()


@dataclass(frozen=True)
class _Parts:
    """What :meth:`ControlPlaneService.setup` opens and builds."""

    credentials: Credentials
    store: Store
    core: ControlPlane
    verifier: TokenVerifier
    handlers: Handlers
    app: web.Application


#: What was generated (the file's name in the data dir) -> (event, level, hint). Each line names only
#: what was actually missing, and what to do with the generated file.
_GENERATED: dict[str, tuple[str, str, str]] = {
    "delegate-token": (
        "controlplane.credentials_generated",
        "warning",
        "no delegate token was configured (--delegate-token-file or CONTROL_PLANE_DELEGATE_TOKENS); one was "
        "generated here (mode 0600): give it to the delegates as DELEGATE_TOKEN_FILE",
    ),
    "api-key": (
        "controlplane.credentials_generated",
        "warning",
        "no API key was configured (--api-key-file or CONTROL_PLANE_API_KEY); one was generated here (mode "
        "0600): the CLI reads it as CONTROL_PLANE_API_KEY",
    ),
    "oidc-keys.json": (
        "controlplane.oidc_keys_generated",
        "info",
        "--oidc-issuer is set and there was no OIDC key file; one was generated here (mode 0600): back it up with "
        "the database; AWS trusts tokens signed by it once an IAM identity provider names the issuer (docs/oidc.md)",
    ),
    "task-signing-key": (
        "controlplane.task_signing_key_generated",
        "info",
        "no --task-signing-key-file was given; a task signing key was generated here (mode 0600), and its public "
        "key beside it in task-signing-key.pub: set that as the delegates' AGENT_TASK_PUBLIC_KEY and they run "
        "only tasks this control plane signed",
    ),
}


#: How often a replica adopts the tokens others created or revoked.
TOKEN_FOLLOW_SECONDS = 1.0

#: The OIDC key file's name in the data dir.
OIDC_KEY_FILE = "oidc-keys.json"

#: The database's file name in the data dir.
DATABASE_FILE = "controlplane.sqlite3"


def _log_generated(path: Path) -> None:
    event, level, hint = _GENERATED.get(
        path.name, ("controlplane.credentials_generated", "warning", "it was missing; one was generated here")
    )
    (log.warning if level == "warning" else log.info)(event, path=str(path), hint=hint)


def _event(change: StatusChange, url: str) -> dict[str, Any]:
    return status_change_event(
        identifier=change.identifier,
        name=change.name,
        from_status=change.old,
        to_status=change.new,
        tested_at=change.tested_at,
        error_summary=change.error_summary,
        failure=change.failure,
        delegate_name=change.delegate_name,
        failures_in_row=change.failures_in_row,
        control_plane=url or None,
    )


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def make_app(handlers: Handlers) -> web.Application:
    # The console's middleware sits inside the JSON error middleware: its pages fail as HTML pages.
    console = Console(handlers)
    middlewares = [metrics_middleware(handlers.cp.metrics), error_middleware, console.middleware]
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, bind(route, handlers), name=route.handler)
    if handlers.oidc is not None:
        _add_oidc_routes(app, handlers.oidc)
    console.add_routes(app)
    return app


def _add_oidc_routes(app: web.Application, issuer: OidcIssuer) -> None:
    """The two public documents AWS reads to verify our tokens, under the issuer URL's path."""
    cache = f"public, max-age={JWKS_MAX_AGE_SECONDS}"

    async def discovery(_: web.Request) -> web.Response:
        response = json_response(issuer.discovery())
        response.headers["Cache-Control"] = cache
        return response

    async def jwks(_: web.Request) -> web.Response:
        response = json_response(issuer.jwks())
        response.headers["Cache-Control"] = cache
        return response

    app.router.add_get(f"{issuer.path}/.well-known/openid-configuration", discovery, name="oidc_discovery")
    app.router.add_get(f"{issuer.path}/.well-known/jwks.json", jwks, name="oidc_jwks")


def config_from_env(environ: Mapping[str, str], **overrides: Any) -> ControlPlaneConfig:
    """Read ``CONTROL_PLANE_*`` variables (the CLI passes flags as overrides)."""
    values: dict[str, Any] = {
        "delegate_tokens": environ.get("CONTROL_PLANE_DELEGATE_TOKENS") or None,
        "api_key": environ.get("CONTROL_PLANE_API_KEY") or None,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ControlPlaneConfig(**values)
