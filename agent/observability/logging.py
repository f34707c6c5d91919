"""Structured logging: JSON in production, console on a terminal, and no secret ever printed.

The :class:`Redactor` is one object owned by the process's owner (agent or control plane) and
used in two places: as the last processor before rendering (so every event, stdlib records from
botocore and aiohttp included, is scrubbed) and on task results before they leave the delegate.
It masks the *values* of secrets the process has seen (delegate token, resolved connector
secrets, AWS secret keys and session tokens) wherever they appear, and the values of keys that
look secret.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping
from datetime import datetime
from typing import Any, Literal, TextIO

import msgspec
import structlog

MASK = "[REDACTED]"
LogFormat = Literal["json", "console"]

_SECRET_KEY = re.compile(
    r"(secret|password|passwd|token|authorization|api[_-]?key|apikey|private[_-]?key|session[_-]?key|credential|"
    r"external[_-]?id|signature|cookie)",
    re.IGNORECASE,
)
# Keys that mention a secret but hold none: where it is, what it is called, how many there are.
_SAFE_SUFFIXES = (
    "_file",
    "_path",
    "_name",
    "_names",
    "_id",
    "_ids",
    "_ref",
    "_refs",
    "_source",
    "_type",
    "_count",
    "_seconds",
    "_dir",
    "file",
    "path",
    "Ref",
    "Name",
    "Id",
    "Type",
    "Source",
)
_MIN_SECRET_LENGTH = 6
#: Clean strings remembered (see Redactor._clean): at most this many, each at most this long.
_CLEAN_MAX_ENTRIES = 4096
_CLEAN_MAX_LENGTH = 512
# Credentials inside text that no one has registered yet: botocore's debug log prints a response body
# (STS AssumeRole, IAM CreateAccessKey, container and instance credentials) before the code that
# asked for it can hand the keys to the redactor. XML elements and quoted keys (JSON, Python reprs).
_CREDENTIAL_FIELDS = (
    "SecretAccessKey|SessionToken|secretAccessKey|sessionToken|Token|X-Amz-Security-Token|WebIdentityToken"
)
_CREDENTIAL_XML = re.compile(rf"<({_CREDENTIAL_FIELDS})>[^<]*</\1>")
_CREDENTIAL_QUOTED = re.compile(rf"""(["'](?:{_CREDENTIAL_FIELDS})["']\s*:\s*b?)(["'])(?:(?!\2).)*\2""")


class Redactor:
    """Masks known secret values and secret-looking keys; thread-safe, bounded.

    Values are indexed by their first few characters, so adding one costs a dict insert and
    scanning a string costs one lookup per character whatever the number of secrets held. (A
    regex alternation of all values, the obvious way, recompiles on every new secret and scans
    every branch at every position: at 4,096 secrets that is 0.5 s per add and 3 ms per string.)
    """

    def __init__(self, max_values: int = 4096) -> None:
        self._values: OrderedDict[str, None] = OrderedDict()
        self._max = max_values
        self._lock = threading.Lock()
        #: First _MIN_SECRET_LENGTH characters -> the values starting so, longest first. Entries
        #: are replaced, never mutated, so a reader on another thread sees a whole tuple.
        self._index: dict[str, tuple[str, ...]] = {}
        #: Long-lived secrets (the delegate token, the control plane's tokens and keys): never evicted
        #: by the bound, however many short-lived session keys arrive after them.
        self._pinned: set[str] = set()
        #: Strings already scanned and found clean, for the secrets held now (replaced, not cleared,
        #: when one is added: a scan that began before sees its own set go stale, never the new one).
        #: A result document repeats most of its strings task after task (names, regions, ARNs).
        #: Two generations: a full one becomes the older and a string found there moves back, so the
        #: strings every task repeats outlive the ones a single task brought (a connector's name).
        self._clean: set[str] = set()
        self._older: set[str] = set()

    def pin(self, *values: str | None) -> None:
        """Remember secret values for the life of the process (outside the bound ``add`` keeps)."""
        with self._lock:
            for value in values:
                if not value or len(value) < _MIN_SECRET_LENGTH or value in self._pinned:
                    continue
                self._pinned.add(value)
                self._values.pop(value, None)
                prefix = value[:_MIN_SECRET_LENGTH]
                if value not in self._index.get(prefix, ()):
                    self._index[prefix] = tuple(sorted((*self._index.get(prefix, ()), value), key=len, reverse=True))
                    self._clean, self._older = set(), set()

    def add(self, *values: str | None) -> None:
        """Remember secret values so they are masked wherever they show up later."""
        with self._lock:
            for value in values:
                if not value or len(value) < _MIN_SECRET_LENGTH or value in self._pinned:
                    continue
                if value in self._values:
                    self._values.move_to_end(value)
                    continue
                self._values[value] = None
                prefix = value[:_MIN_SECRET_LENGTH]
                # Longest first, so a secret that contains another is masked whole.
                self._index[prefix] = tuple(sorted((*self._index.get(prefix, ()), value), key=len, reverse=True))
                self._clean, self._older = set(), set()
                while len(self._values) > self._max:
                    old, _ = self._values.popitem(last=False)
                    prefix = old[:_MIN_SECRET_LENGTH]
                    rest = tuple(v for v in self._index.get(prefix, ()) if v != old or v in self._pinned)
                    if rest:
                        self._index[prefix] = rest
                    else:
                        self._index.pop(prefix, None)

    def __len__(self) -> int:
        return len(self._values)

    def text(self, value: str) -> str:
        clean, older = self._clean, self._older
        if value in clean:
            return value
        if value in older:
            clean.add(value)
            return value
        masked = self._mask(value)
        if len(value) <= _CLEAN_MAX_LENGTH and masked == value:
            if len(clean) >= _CLEAN_MAX_ENTRIES:
                with self._lock:
                    if self._clean is clean:  # not replaced by a secret learnt meanwhile
                        self._older, self._clean = clean, set()
                clean = self._clean
            clean.add(value)
        return masked

    def _mask(self, value: str) -> str:
        if "Token" in value or "ecretAccessKey" in value:
            value = _CREDENTIAL_XML.sub(rf"<\1>{MASK}</\1>", value)
            value = _CREDENTIAL_QUOTED.sub(rf"\1\2{MASK}\2", value)
        index = self._index
        if not index or len(value) < _MIN_SECRET_LENGTH:
            return value
        get = index.get
        out: list[str] = []
        start = i = 0
        last = len(value) - _MIN_SECRET_LENGTH
        while i <= last:
            candidates = get(value[i : i + _MIN_SECRET_LENGTH])
            if candidates is not None:
                for secret in candidates:
                    if value.startswith(secret, i):
                        out.append(value[start:i])
                        out.append(MASK)
                        i = start = i + len(secret)
                        break
                else:
                    i += 1
                continue
            i += 1
        if not out:
            return value
        out.append(value[start:])
        return "".join(out)

    def value(self, value: Any, key: str | None = None) -> Any:
        """A copy of ``value`` with secrets masked (dicts and lists are walked)."""
        if key is not None and is_secret_key(key) and value not in (None, "", [], {}):
            return MASK
        kind = type(value)  # the wire's own types first, without the abstract-class checks below
        if kind is str:
            return self.text(value)
        if kind is dict:
            return {k: self.value(v, k if type(k) is str else str(k)) for k, v in value.items()}
        if value is None or kind is int or kind is bool or kind is float:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.value(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v) for v in value]
        if isinstance(value, BaseException):
            return self.text(f"{type(value).__name__}: {value}")
        if isinstance(value, msgspec.Struct):
            return self._struct(value)
        return value

    def _struct(self, value: msgspec.Struct) -> Any:
        """``value`` with secrets masked: the very object when it holds none (a result document, the
        common case, then costs a walk over its fields and no copy). Keys are its wire names, as a
        reader sees them; a timestamp or a number cannot hold a secret and is not turned into text."""
        changed: dict[str, Any] | None = None
        for name, secret_key in _struct_fields(type(value)):
            field = getattr(value, name)
            new: Any
            if field is None:
                continue
            kind = type(field)
            if secret_key:
                if field in ("", [], {}):
                    continue
                new = MASK
            elif kind is bool or kind is int or kind is float or kind is datetime:
                continue
            elif kind is str:
                new = self.text(field)
            elif kind is list:
                items = [self._same(v) for v in field]
                new = items if any(a is not b for a, b in zip(items, field, strict=True)) else field
            else:
                new = self._same(field)
            if new is not field:
                if changed is None:
                    changed = {}
                changed[name] = new
        return value if changed is None else msgspec.structs.replace(value, **changed)

    def _same(self, value: Any) -> Any:
        """Inside a Struct: another Struct or a string is kept as it is when clean; anything else is
        walked (and copied) as :meth:`value` does."""
        if type(value) is str:
            return self.text(value)
        if isinstance(value, msgspec.Struct):
            return self._struct(value)
        new = self.value(value)
        return value if new == value else new

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for k in list(event_dict):
            event_dict[k] = self.value(event_dict[k], None if k == "event" else k)
        return event_dict


@functools.cache
def _struct_fields(kind: type[msgspec.Struct]) -> tuple[tuple[str, bool], ...]:
    """Each field of a Struct type: its attribute name, and whether its wire name looks secret."""
    return tuple((f.name, is_secret_key(f.encode_name)) for f in msgspec.structs.fields(kind))


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key)) and not key.endswith(_SAFE_SUFFIXES)


def _json_dumps(obj: Any, **_: Any) -> str:
    return msgspec.json.encode(obj, enc_hook=str).decode()


def configure_logging(
    *,
    fmt: LogFormat | None = None,
    level: str = "info",
    redactor: Redactor | None = None,
    stream: TextIO | None = None,
    static: Mapping[str, Any] | None = None,
    cache: bool = False,
) -> None:
    """Configure structlog and route stdlib logging through it (called once, at the edge).

    ``cache``: each module's logger binds its configuration at its first line and keeps it, which
    halves the cost of a line (22 -> 11 us for the one per task). Only for a process configured once
    and for good, as the daemon is: a cached logger never sees a later configure (tests capture logs
    that way).
    """
    stream = stream or sys.stderr
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    # Not `redactor or ...`: a Redactor with no secrets yet is falsy (__len__ 0), and it must be this one.
    redact = redactor if redactor is not None else Redactor()
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json_dumps)
    extra: list[Any] = []
    if static:
        fixed = dict(static)

        def add_static(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
            for k, v in fixed.items():
                event_dict.setdefault(k, v)
            return event_dict

        extra.append(add_static)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *extra,
    ]
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, redact, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=cache,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))
    for noisy in ("botocore", "aiobotocore", "aiohttp.access", "urllib3", "werkzeug", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A failed credential refresh (a denied AssumeRole, say) is reported precisely in the task's
    # result; botocore's own warning with a traceback would only repeat it, louder.
    for quiet in ("botocore.credentials", "aiobotocore.credentials"):
        logging.getLogger(quiet).setLevel(logging.ERROR)
