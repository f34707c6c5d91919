"""The delegate registry: who is connected, with which tags, bound to which token.

A delegate is bound to the *name* of the token that registered it; only that token may act for it
(heartbeat, acquire, renew, report). Tasks a delegate leaves behind (it deregisters, is removed,
or registers again under another token) go back to the queue through :class:`TaskQueue`.
"""

from __future__ import annotations

import secrets

import structlog

from agent.controlplane.clock import ts
from agent.controlplane.failures import ApiFailure
from agent.controlplane.queue import TaskQueue
from agent.controlplane.routing import CONNECTED, normalise_tags
from agent.controlplane.settings import ControlPlaneSettings
from agent.controlplane.store import DelegateRow, Store, with_updates
from agent.controlplane.tokens import Caller
from agent.protocol.auth import Clock
from agent.protocol.errors import Code
from agent.protocol.models import (
    DelegateView,
    HeartbeatRequest,
    HeartbeatResponse,
    Problem,
    RegisterRequest,
    RegisterResponse,
)

log = structlog.get_logger("controlplane")


class Registry:
    """Registration, heartbeats and goodbyes of delegates."""

    def __init__(self, store: Store, settings: ControlPlaneSettings, clock: Clock, queue: TaskQueue) -> None:
        self.store, self.settings, self._clock, self._queue = store, settings, clock, queue
        #: When each delegate was last heard by this process, even if the store refused to record it.
        self.seen: dict[str, float] = {}

    async def register(self, req: RegisterRequest, *, caller: Caller | None = None) -> RegisterResponse:
        """Register (or register again) a delegate, bound to the token that signed the request.

        ``caller`` is None only for in-process callers (tests, the demo): the HTTP layer always
        passes the request's token, and the delegate stays bound to that token's name.
        """
        now = self._clock()
        existing = await self.store.delegate_by_instance(req.instance_id)
        tags = normalise_tags([*req.tags, req.name])
        if caller is not None:
            self._check_scope(req, tags, caller)
            if existing is not None and existing.token_name not in (None, caller.token_name):
                await self._rebind(existing, caller)
                existing = None
        delegate_id = existing.id if existing else "dlg_" + secrets.token_hex(8)
        row = DelegateRow(
            id=delegate_id,
            name=req.name,
            instance_id=req.instance_id,
            hostname=req.hostname,
            tags=tags,
            version=req.version,
            task_types=tuple(req.task_types),
            capacity=req.capacity,
            state="running",
            in_flight=existing.in_flight if existing else 0,
            token_name=caller.token_name if caller else existing.token_name if existing else None,
            registered_at=existing.registered_at if existing else now,
            last_heartbeat=now,
        )
        await self.store.save_delegate(row)
        log.info(
            "controlplane.delegate_registered",
            delegate_id=delegate_id,
            delegate=req.name,
            tags=list(tags),
            token_name=row.token_name,
            again=existing is not None,
        )
        self._queue.wake_delegate(row.id)
        return RegisterResponse(delegate_id=delegate_id, intervals=self.settings.intervals(), server_time=ts(now))

    def _check_scope(self, req: RegisterRequest, tags: tuple[str, ...], caller: Caller) -> None:
        """Refuse a registration whose name or tags the token's scope does not allow, naming them."""
        bad_name, bad_tags = caller.scope.refused(req.name, tags)
        if bad_name is None and not bad_tags:
            return
        refused, problems = [], []
        if bad_name is not None:
            refused.append(f"name {bad_name!r}")
            problems.append(Problem(field="name", message=f"{bad_name!r} is not allowed"))
        if bad_tags:
            refused.append(f"tags [{', '.join(bad_tags)}]")
            problems += [Problem(field="tags", message=f"{t!r} is not allowed") for t in bad_tags]
        raise ApiFailure(
            403,
            Code.TOKEN_SCOPE,
            f"delegate token {caller.token_name!r} may not register the {' or the '.join(refused)}: "
            f"it allows {caller.scope.describe()}",
            problems=problems,
        )

    async def _rebind(self, existing: DelegateRow, caller: Caller) -> None:
        """Another token registers an instance: refused while the instance's own token still counts.

        Once that token is revoked or no longer configured, its delegate can no longer speak, and
        this registration starts afresh: a new delegate id, and the old one's leases re-queued, so
        the new token gains nothing it could not get by registering a new instance.
        """
        assert existing.token_name is not None
        if caller.is_active(existing.token_name):
            raise ApiFailure(
                403,
                Code.DELEGATE_TOKEN_MISMATCH,
                f"instance {existing.instance_id!r} is registered with another delegate token; only that token "
                "may register it again. A new delegate process uses a new instanceId",
            )
        async with self.store.transaction():
            await self._give_back(existing, f"delegate {existing.name} registered again with another token")
            await self.store.delete_delegate(existing.id)
        log.warning(
            "controlplane.delegate_rebound",
            delegate_id=existing.id,
            delegate=existing.name,
            old_token_name=existing.token_name,
            token_name=caller.token_name,
        )

    async def _give_back(self, d: DelegateRow, reason: str, *, count_attempt: bool = False) -> None:
        for t in await self.store.running_tasks(d.id):
            await self._queue.requeue(t, reason=reason, count_attempt=count_attempt)

    async def delegate(self, delegate_id: str, caller: Caller | None = None) -> DelegateRow:
        """The delegate, when ``caller`` (None: in-process) is the token it is bound to."""
        d = await self.store.get_delegate(delegate_id)
        if d is None:
            raise ApiFailure(404, Code.UNKNOWN_DELEGATE, f"unknown delegate {delegate_id}: register again")
        if caller is not None and d.token_name != caller.token_name:
            if d.token_name is None or not caller.is_active(d.token_name):
                # Bound to no token (an older row) or to one that is gone: its holder may register again.
                raise ApiFailure(404, Code.UNKNOWN_DELEGATE, f"unknown delegate {delegate_id}: register again")
            raise ApiFailure(
                403,
                Code.DELEGATE_TOKEN_MISMATCH,
                f"delegate {delegate_id} was registered with another delegate token; only that token may act for it",
            )
        return d

    async def touch(self, d: DelegateRow, **values: object) -> DelegateRow:
        """Record that ``d`` was heard now (and any state it reported)."""
        values["last_heartbeat"] = self.seen[d.id] = self._clock()
        if d.state not in CONNECTED and "state" not in values:
            values["state"] = "running"
            log.info("controlplane.delegate_reconnected", delegate_id=d.id, delegate=d.name)
        await self.store.update_delegate(d.id, **values)
        if values.get("state") not in (None, d.state):
            self._queue.wake_delegate(d.id)
        return with_updates(d, **values)

    async def heartbeat(
        self, delegate_id: str, req: HeartbeatRequest, *, caller: Caller | None = None
    ) -> HeartbeatResponse:
        d = await self.touch(await self.delegate(delegate_id, caller), state=req.state, in_flight=len(req.in_flight))
        cancel = [t.id for t in await self.store.running_tasks(d.id) if t.cancel_requested]
        return HeartbeatResponse(cancel=cancel, intervals=self.settings.intervals())

    async def deregister(self, delegate_id: str, *, caller: Caller | None = None) -> None:
        d = await self.delegate(delegate_id, caller)
        async with self.store.transaction():
            await self.store.update_delegate(d.id, state="deregistered", in_flight=0)
            await self._give_back(d, f"delegate {d.name} deregistered")
        self._queue.wake_delegate(d.id)
        log.info("controlplane.delegate_deregistered", delegate_id=d.id, delegate=d.name)

    async def forget(self, delegate_id: str, *, force: bool = False) -> None:
        """Remove a delegate entirely. A connected one only with ``force``: if alive, it registers again."""
        d = await self.delegate(delegate_id)
        if d.state in CONNECTED and not force:
            raise ApiFailure(
                409,
                Code.CONFLICT,
                f"delegate {d.name} ({d.id}) is connected ({d.state}): stop it first, or pass force (--force); "
                "a live delegate registers again",
            )
        async with self.store.transaction():
            await self._give_back(d, f"delegate {d.name} was removed")
            await self.store.delete_delegate(d.id)
        self._queue.wake_delegate(d.id)

    async def views(self) -> list[DelegateView]:
        running = await self.store.in_flight()
        return [
            DelegateView(
                delegate_id=d.id,
                name=d.name,
                instance_id=d.instance_id,
                hostname=d.hostname,
                tags=list(d.tags),
                version=d.version,
                task_types=list(d.task_types),
                capacity=d.capacity,
                state="lost" if d.state == "disconnected" else d.state,  # type: ignore[arg-type]
                in_flight=running.get(d.id, 0),
                registered_at=ts(d.registered_at),
                last_heartbeat_at=ts(d.last_heartbeat),
                token_name=d.token_name,
            )
            for d in await self.store.delegates()
        ]

    async def sweep(self, now: float) -> None:
        """Disconnect delegates silent too long (their tasks re-queue); forget long-gone ones."""
        for d in await self.store.delegates():
            silent = now - max(d.last_heartbeat, self.seen.get(d.id, 0.0))
            if d.state in CONNECTED and silent > self.settings.disconnect_after:
                if not await self._mark_lost(d):
                    continue
                log.warning(
                    "controlplane.delegate_disconnected",
                    delegate_id=d.id,
                    delegate=d.name,
                    silent_seconds=round(silent, 1),
                )
                await self._give_back(d, f"delegate {d.name} disconnected", count_attempt=True)
            elif d.state not in CONNECTED and silent > self.settings.forget_disconnected_after_seconds:
                await self.store.delete_delegate(d.id)

    async def _mark_lost(self, d: DelegateRow) -> bool:
        """Mark ``d`` lost unless it was heard meanwhile (by another replica): True if marked."""
        current = await self.store.get_delegate(d.id)
        if current is None or current.last_heartbeat != d.last_heartbeat:
            return False
        await self.store.update_delegate(d.id, state="lost")
        return True
