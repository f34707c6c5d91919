"""Long-lived aiobotocore clients, shared by every validation, each request signed for its task.

Creating a client per validation costs far more than the validation (model lookup, endpoint
rulesets, a new connection pool and SSL context): measured at ~190 ms of CPU against ~5 ms for a
shared client (``shared/reference/baselines.md``). So there is one client per (service, region,
retry policy). Every request is signed with the credentials bound to the *current task* through a
context variable owned by this object: a task's credentials cannot leak into another task, even
with many running at once on one client.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.credentials import AioCredentialResolver, AioCredentials
from aiobotocore.httpsession import AIOHTTPSession
from aiobotocore.retries.standard import AioRetryHandler, AioRetryPolicy, AioStandardRetryConditions
from aiobotocore.session import AioSession
from botocore.credentials import CredentialProvider
from botocore.exceptions import NoCredentialsError
from botocore.loaders import Loader
from botocore.retries import quota
from botocore.retries.standard import RetryEventAdapter, RetryQuotaChecker

from agent._version import __version__
from agent.aws.connector import BackoffStrategy
from agent.aws.environment import AwsEnvironment

MODELS_DIR = Path(__file__).parent / "models"
SERVICES = ("sts", "ec2", "iam")


class _SharedTlsSession(AIOHTTPSession):  # type: ignore[misc]
    """aiobotocore's HTTP session, with one TLS context for every client that verifies alike.

    aiobotocore builds a context per client and loads the whole CA bundle into each: about 2 MiB
    and a few milliseconds apiece, for contexts that are identical. A context is safe to share
    between connections; it is shared only when no client certificate would be loaded into it.
    """

    _contexts: dict[Any, ssl.SSLContext] = {}  # deliberately one per process
    _lock = threading.Lock()  # the context may be built in a worker thread (aiobotocore #1469)

    def _build_ssl_contexts(self, proxy_url: str | None) -> tuple[ssl.SSLContext, ssl.SSLContext | None]:
        if self._cert_file:
            return super()._build_ssl_contexts(proxy_url)  # type: ignore[no-any-return]
        key = self._verify if isinstance(self._verify, str | bool) else repr(self._verify)
        with self._lock:
            context = self._contexts.get(key)
            if context is None:
                context = self._contexts[key] = self._build_verify_context()
        # The proxy's context is its own: aiobotocore loads the proxy's CA and certificate into it.
        proxy = self._setup_proxy_ssl_context(proxy_url) if proxy_url else None
        return context, proxy


@dataclass(frozen=True)
class RetryPolicy:
    """How one client retries: botocore's mode and attempts, or a connector's Harness backoff override."""

    mode: str = "standard"
    total_attempts: int = 3
    backoff: BackoffStrategy | None = None

    @classmethod
    def for_connector(cls, env: AwsEnvironment, backoff: BackoffStrategy | None) -> RetryPolicy:
        if backoff is None:
            return cls(mode=env.retry_mode, total_attempts=env.max_attempts)
        # Harness counts retries; botocore counts attempts (the first try included).
        return cls(mode="standard", total_attempts=backoff.retry_count + 1, backoff=backoff)


class _TaskCredentials(AioCredentials):  # type: ignore[misc]
    """Stands in for the real credentials on a shared client: each signature asks the current task."""

    def __init__(self, current: ContextVar[Any]) -> None:
        super().__init__("per-task", "per-task", None, method="per-task")
        self._current = current

    async def get_frozen_credentials(self) -> Any:
        creds = self._current.get()
        if creds is None:
            raise NoCredentialsError()
        return await creds.get_frozen_credentials()


class _TaskCredentialProvider(CredentialProvider):  # type: ignore[misc]
    METHOD = "per-task"

    def __init__(self, creds: _TaskCredentials) -> None:
        super().__init__()
        self._creds = creds

    async def load(self) -> _TaskCredentials:
        return self._creds


class HarnessBackoff:
    """Delay before retry N for the three strategies of ``awsSdkClientBackOffStrategyOverride``."""

    def __init__(self, strategy: BackoffStrategy, rand: Callable[[], float] = random.random) -> None:
        self._s = strategy
        self._rand = rand

    def delay(self, retry: int) -> float:
        s = self._s
        if s.kind == "FixedDelayBackoffStrategy":
            return float(s.base_delay_ms) / 1000
        ceiling = min(s.max_backoff_ms, s.base_delay_ms * 2 ** max(0, retry - 1)) / 1000
        if s.kind == "EqualJitterBackoffStrategy":
            return float(ceiling / 2 + self._rand() * ceiling / 2)
        return float(self._rand() * ceiling)

    def delay_amount(self, context: Any) -> float:  # botocore's backoff interface
        return float(self.delay(int(context.attempt_number)))


def _install_backoff(client: Any, policy: RetryPolicy) -> None:
    """Replace botocore's standard-mode delays with the connector's strategy (attempts unchanged)."""
    assert policy.backoff is not None
    name = client.meta.service_model.service_id.hyphenize()
    unique = f"retry-config-{name}"
    client.meta.events.unregister(f"needs-retry.{name}", unique_id=unique)
    handler = AioRetryHandler(
        retry_policy=AioRetryPolicy(
            retry_checker=AioStandardRetryConditions(max_attempts=policy.total_attempts),
            retry_backoff=HarnessBackoff(policy.backoff),
        ),
        retry_event_adapter=RetryEventAdapter(),
        retry_quota=RetryQuotaChecker(quota.RetryQuota()),
    )
    client.meta.events.register(f"needs-retry.{name}", handler.needs_retry, unique_id=unique)


@dataclass
class _Entry:
    client: Any
    users: int = 0


class AwsClients:
    """The pool of shared clients; bind a task's credentials with :meth:`bound`."""

    def __init__(
        self,
        env: AwsEnvironment,
        *,
        max_clients: int = 64,
        pool_connections: int = 32,
        user_agent: str = f"delegate-agent/{__version__}",
    ) -> None:
        self.env = env
        self._max = max_clients
        self._pool_connections = pool_connections
        self._user_agent = user_agent
        self._current: ContextVar[Any] = ContextVar(f"aws-task-credentials-{id(self)}", default=None)
        loader = Loader()
        # Our pruned models first: ~18 KB instead of megabytes; everything else from botocore.
        loader.search_paths.insert(0, str(MODELS_DIR))
        self.loader = loader
        self._session = AioSession()
        self._session.register_component("data_loader", loader)
        self._session.register_component(
            "credential_provider", AioCredentialResolver([_TaskCredentialProvider(_TaskCredentials(self._current))])
        )
        self._session.set_config_variable("sts_regional_endpoints", env.sts_regional_endpoints)
        self._entries: OrderedDict[tuple[str, str, RetryPolicy], _Entry] = OrderedDict()
        self._locks: dict[tuple[str, str, RetryPolicy], asyncio.Lock] = {}
        self._closed = False

    @property
    def session(self) -> AioSession:
        """A session sharing our models (for the default credential chain's own lookups)."""
        return self._session

    # --- credentials ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def bound(self, credentials: Any) -> Iterator[None]:
        """Sign every request made inside the block with ``credentials`` (``None``: unsigned calls only)."""
        token = self._current.set(credentials)
        try:
            yield
        finally:
            self._current.reset(token)

    # --- clients -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def client(self, service: str, region: str, policy: RetryPolicy | None = None) -> AsyncIterator[Any]:
        """The shared client for (service, region, policy), held open while the block runs."""
        key = (service, region, policy or RetryPolicy(self.env.retry_mode, self.env.max_attempts))
        entry = self._entries.get(key)
        if entry is None:
            lock = self._locks.setdefault(key, asyncio.Lock())
            async with lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = _Entry(await self._create(*key))
                    self._entries[key] = entry
                    await self._evict()
        self._entries.move_to_end(key)
        entry.users += 1
        try:
            yield entry.client
        finally:
            entry.users -= 1

    def sts_creator(self, region: str, policy: RetryPolicy | None = None) -> Callable[..., Any]:
        """A ``client_creator`` for aiobotocore's credential fetchers that lends the shared STS client.

        The fetchers pass the source credentials as keyword arguments (AssumeRole) or none at all
        (AssumeRoleWithWebIdentity, which is unsigned); they are bound for the one call.
        """

        def creator(service_name: str, **kwargs: Any) -> Any:
            assert service_name == "sts"
            creds = None
            if kwargs.get("aws_access_key_id"):
                creds = AioCredentials(
                    kwargs["aws_access_key_id"],
                    kwargs["aws_secret_access_key"],
                    kwargs.get("aws_session_token"),
                    method="source",
                )
            return self._lend("sts", region, policy, creds)

        return creator

    @contextlib.asynccontextmanager
    async def _lend(self, service: str, region: str, policy: RetryPolicy | None, creds: Any) -> AsyncIterator[Any]:
        async with self.client(service, region, policy) as client:
            with self.bound(creds):
                yield client

    async def _create(self, service: str, region: str, policy: RetryPolicy) -> Any:
        endpoint = self.env.endpoint_for(service)
        client = await self._open(service, region, policy, endpoint, {})
        proxies = self.env.proxies_for(client.meta.endpoint_url)
        if proxies:
            # The proxy decision needs the resolved endpoint (NO_PROXY); reopen with it (once per client).
            await client.close()
            client = await self._open(service, region, policy, endpoint, proxies)
        if policy.backoff is not None:
            _install_backoff(client, policy)
        return client

    async def _open(
        self, service: str, region: str, policy: RetryPolicy, endpoint: str | None, proxies: dict[str, str]
    ) -> Any:
        config = AioConfig(
            connect_timeout=self.env.connect_timeout,
            read_timeout=self.env.read_timeout,
            retries={"mode": policy.mode, "total_max_attempts": policy.total_attempts},
            user_agent=self._user_agent,
            max_pool_connections=self._pool_connections,
            proxies=proxies,
            use_fips_endpoint=self.env.use_fips,
            http_session_cls=_SharedTlsSession,
        )
        ctx = self._session.create_client(
            service, region_name=region, endpoint_url=endpoint, config=config, verify=self.env.ca_bundle or True
        )
        return await ctx.__aenter__()

    async def _evict(self) -> None:
        while len(self._entries) > self._max:
            victim = next((k for k, e in self._entries.items() if e.users == 0), None)
            if victim is None:
                return
            entry = self._entries.pop(victim)
            await entry.client.close()

    async def warm(self, region: str = "us-east-1") -> None:
        """Load models and endpoint rules before the first task, so it does not stall the loop."""
        for service in SERVICES:
            async with self.client(service, region):
                pass

    async def close(self) -> None:
        self._closed = True
        entries, self._entries = list(self._entries.values()), OrderedDict()
        for entry in entries:
            await entry.client.close()

    def __len__(self) -> int:
        return len(self._entries)
