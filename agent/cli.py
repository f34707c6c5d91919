"""``delegate-agent``: the command line, where objects are wired and errors become exit codes.

Exit codes: 0 success; 1 a connection test (or validation) failed; 2 usage or input error;
3 the control plane is unreachable or refused our credentials; 4 no test result within the wait
(the task goes on); 130 interrupted. A user's mistake is one clear line on stderr, never a
traceback.
"""

from __future__ import annotations

# Only what building the parser needs is imported here: `delegate-agent --help` and `--version`
# must start in well under 150 ms, and a client command (`connector list`) must not pay for asyncio,
# YAML or the daemon. Each command imports what it uses when it runs (PLC0415 is allowed here),
# and `make bench BENCH_ARGS="--only startup"` measures the result.
import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from agent._version import __version__

if TYPE_CHECKING:
    from datetime import datetime

    from agent.aws.environment import AwsEnvironment
    from agent.observability.logging import Redactor
    from agent.observability.metrics import AgentMetrics
    from agent.protocol.api_client import ApiClient
    from agent.protocol.models import ApplyResult, ConnectorHealth, DelegateView, Problem, TaskView, TokenView
    from agent.protocol.results import ValidationResult
    from agent.runtime.agent import Agent
    from agent.runtime.settings import AgentSettings
    from agent.taskapi import TaskHandler

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
#: A test (or ``tasks get --wait``) ran out of time; the task goes on: ``tasks get ID`` fetches it later.
EXIT_PENDING = 4
#: Ctrl-C: the task keeps running on the control plane.
EXIT_INTERRUPTED = 130

DEFAULT_CONTROL_PLANE = "http://127.0.0.1:8080"
#: ``agent.protocol.auth.DEFAULT_AUDIENCE``, written out so ``--help`` imports nothing (a test keeps them equal).
_DEFAULT_AUDIENCE = "delegate-agent-control-plane"


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


# --- output helpers ----------------------------------------------------------------------------

#: Status words coloured on a terminal (SGR codes): green, red, yellow.
_COLOURS = {"SUCCESS": "32", "ok": "32", "FAILURE": "31", "FAILED": "31", "PENDING": "33"}


def _colour(out: Any) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org) or TERM=dumb."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())


def _paint(text: str, out: Any) -> str:
    """``text`` (padded or not) with its leading status word coloured, when ``out`` is a terminal."""
    word = text.split(" ", 1)[0]
    code = _COLOURS.get(word)
    if code is None or not _colour(out):
        return text
    return f"\033[{code}m{word}\033[0m{text[len(word) :]}"


def _print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], out: Any = None) -> None:
    """Aligned columns; an absent value (None, empty) is ``-``, never Python's ``None``.

    On a terminal the status words of a "status" or "last test" column are coloured (after padding).
    """
    out = out or sys.stdout
    cells = [[("-" if c is None or c == "" else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip(), file=out)
    status = [h in ("status", "last test") for h in headers]  # only these hold status words to colour
    for r in cells:
        padded = [c.ljust(w) for c, w in zip(r, widths, strict=True)]
        print(
            "  ".join(_paint(c, out) if paint else c for c, paint in zip(padded, status, strict=True)).rstrip(),
            file=out,
        )


def _print_json(value: Any) -> None:
    import msgspec

    data = msgspec.to_builtins(value) if isinstance(value, msgspec.Struct) else value
    print(json.dumps(data, indent=2, default=str))


class _Errors:
    """How :func:`_err` writes: lines of text, or with ``-o json`` one JSON object (set by :func:`main`)."""

    as_json = False


def _err(message: str, problems: Sequence[Any] = (), code: str | None = None) -> None:
    """An error, once, on stderr: ``delegate-agent: message`` and a line per problem, or ``{"error": ...}``."""
    if _Errors.as_json:
        error: dict[str, Any] = {"message": message}
        if code:
            error["code"] = code
        if problems:
            error["problems"] = [{"field": p.field, "message": p.message} for p in problems]
        print(json.dumps({"error": error}), file=sys.stderr)
        return
    print(f"delegate-agent: {message}", file=sys.stderr)
    for p in problems:
        print(f"  {p.field}: {p.message}", file=sys.stderr)


def _print_problems(headline: str, problems: Sequence[Any]) -> int:
    """A headline, then every problem on its own line (a ``ProblemsError``'s list); exit code 2."""
    _err(headline, problems)
    return EXIT_USAGE


def _os_reason(exc: OSError) -> str:
    """The reason in a few words ("Address already in use"), not asyncio's sentence that repeats the address."""
    import errno

    if exc.errno is not None and exc.errno in errno.errorcode:  # not ssl's library codes
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


# --- the control plane -------------------------------------------------------------------------


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen must be HOST:PORT, not {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - explicit opt-in via the flag


def _interval(value: str) -> float:
    from agent.aws.connector import MAX_TEST_INTERVAL, MIN_TEST_INTERVAL, parse_interval

    try:
        seconds = parse_interval(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds and not MIN_TEST_INTERVAL <= seconds <= MAX_TEST_INTERVAL:
        raise argparse.ArgumentTypeError(f"{value!r} must be between 1m and 168h (or 0 for no scheduled tests)")
    return seconds


def _history_count(value: str) -> int:
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 10_000:
        raise argparse.ArgumentTypeError(f"{value!r} must be a whole number from 1 to 10000")
    return int(value)


def _database_problems(database: str | None, listen_url: str | None, data_dir: str | None) -> list[str]:
    """Every problem with the store options, said at once."""
    from agent.controlplane.store.base import url_problems

    problems = []
    if database is None and data_dir is None:
        problems.append("give --data-dir (SQLite, one process) or --database (Postgres)")
    if database is not None and data_dir is not None:
        problems.append(
            "give --data-dir (SQLite, one process) or --database (Postgres), not both: with --database "
            "nothing is kept in a data dir"
        )
    for flag, url in (("--database", database), ("--database-listen-url", listen_url)):
        if url is not None:
            problems += url_problems(url, flag)
    if listen_url is not None and database is None:
        problems.append("--database-listen-url needs --database")
    return [f"control-plane: {p}" for p in problems]


def cmd_control_plane(args: argparse.Namespace) -> int:
    import asyncio
    import gc
    import signal

    from agent._files import DataDirUnusable
    from agent.controlplane.app import ControlPlaneService, CredentialsError, config_from_env
    from agent.controlplane.core import ControlPlaneSettings
    from agent.observability.http import ConnectionLimits
    from agent.observability.logging import Redactor, configure_logging

    host, port = _parse_listen(args.listen)
    redactor = Redactor()
    configure_logging(fmt=args.log_format, level=args.log_level, redactor=redactor, static={"service": "control-plane"})
    from urllib.parse import unquote

    from agent.controlplane.store.base import url_password

    database = args.database or os.environ.get("CONTROL_PLANE_DATABASE_URL") or None
    listen_url = args.database_listen_url or os.environ.get("CONTROL_PLANE_DATABASE_LISTEN_URL") or None
    problems = _database_problems(database, listen_url, args.data_dir)
    oidc_issuer = args.oidc_issuer or os.environ.get("CONTROL_PLANE_OIDC_ISSUER") or None
    if oidc_issuer is not None:
        from agent.controlplane.oidc import OidcConfigError, check_issuer

        try:
            oidc_issuer = check_issuer(oidc_issuer)
        except OidcConfigError as exc:
            problems.append(f"control-plane: {exc}")
        if database is not None and args.oidc_key_file is None:
            problems.append(
                "control-plane: with --database and --oidc-issuer, give --oidc-key-file (the same keys on every "
                "replica, from a Secret: `delegate-agent oidc rotate-key --key-file FILE` creates one)"
            )
    elif args.oidc_key_file is not None:
        problems.append("control-plane: --oidc-key-file needs --oidc-issuer")
    if problems:
        for problem in problems:
            _err(problem)
        return EXIT_USAGE
    webhook = args.status_webhook or os.environ.get("CONTROL_PLANE_STATUS_WEBHOOK") or None
    if webhook is not None:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(webhook)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            usable = False
        if not usable:
            _err("control-plane: --status-webhook must be an http(s) URL with a host")
            return EXIT_USAGE
        redactor.pin(webhook, *(part for part in webhook.split("/")[3:] if len(part) >= 8))
    for url in (database, listen_url):
        if url:
            redactor.pin(url_password(url), unquote(url_password(url)))
    settings = ControlPlaneSettings(
        heartbeat_seconds=args.heartbeat_seconds,
        poll_wait_seconds=args.poll_wait_seconds,
        lease_seconds=args.lease_seconds,
        pickup_timeout_seconds=args.pickup_timeout_seconds,
        task_timeout_seconds=args.task_timeout_seconds,
        clock_leeway_seconds=args.clock_leeway_seconds,
        connector_test_interval_seconds=args.connector_test_interval,
        connector_history=args.connector_history,
        **({"audience": args.audience} if args.audience else {}),
    )
    config = config_from_env(
        os.environ,
        host=host,
        port=port,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        database_url=database,
        database_listen_url=listen_url,
        database_poll_seconds=args.database_poll_seconds,
        status_webhook_url=webhook,
        oidc_issuer=oidc_issuer,
        oidc_key_file=Path(args.oidc_key_file) if args.oidc_key_file else None,
        oidc_key_days=args.oidc_key_days,
        delegate_token_file=Path(args.delegate_token_file) if args.delegate_token_file else None,
        api_key_file=Path(args.api_key_file) if args.api_key_file else None,
        secrets_dir=Path(args.secrets_dir) if args.secrets_dir else None,
        task_signing_key_file=Path(args.task_signing_key_file) if args.task_signing_key_file else None,
        tls_cert_file=Path(args.tls_cert) if args.tls_cert else None,
        tls_key_file=Path(args.tls_key) if args.tls_key else None,
        tls_client_ca_file=Path(args.tls_client_ca) if args.tls_client_ca else None,
        limits=ConnectionLimits(
            header_timeout=args.header_timeout_seconds,
            keepalive_timeout=args.keepalive_timeout_seconds,
            max_connections=args.max_connections,
        ),
        settings=settings,
    )
    from agent.controlplane.platform import platform_validator_from_env

    validator = platform_validator_from_env(os.environ, secrets_dir=config.secrets_dir, redactor=redactor)
    service = ControlPlaneService(config, platform_validator=validator, on_secret=redactor.pin)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # The handlers only set an event; the shutdown runs here, in order.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await service.setup()  # first: bad credentials or data dir are one line, before "started"
            await service.start()
            where = "Postgres" if database else config.data_dir
            print(f"control plane listening on {service.url} (data in {where})", file=sys.stderr, flush=True)
            # What start-up built lives as long as the process: out of the collector's reach, a full
            # collection no longer walks it on the event loop (issue 20; the delegate does the same).
            gc.collect()
            gc.freeze()
            await stop.wait()
        finally:
            await service.shutdown()

    try:
        asyncio.run(serve())
    except (CredentialsError, DataDirUnusable) as exc:
        _err(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _err(f"cannot listen on {args.listen}: {_os_reason(exc)}")
        return EXIT_USAGE
    return EXIT_OK


# --- user API commands -------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> ApiClient:
    from agent._values import http_url
    from agent.protocol.api_client import ApiClient

    url, url_source = args.control_plane, "--control-plane"
    if not url and os.environ.get("CONTROL_PLANE_URL"):
        url, url_source = os.environ["CONTROL_PLANE_URL"], "CONTROL_PLANE_URL"
    try:
        url = http_url(url or DEFAULT_CONTROL_PLANE)
    except ValueError as exc:
        raise UsageError(f"{url_source} {exc}") from None
    key, key_source = args.api_key, "--api-key"
    if not key and os.environ.get("CONTROL_PLANE_API_KEY"):
        key, key_source = os.environ["CONTROL_PLANE_API_KEY"], "CONTROL_PLANE_API_KEY"
    # `--api-key "$(cat api-key)"` of a file with CRLF, or a secret mounted with its newline: the
    # key is the text between. Whatever is left must fit in a header; the key itself is never shown.
    key = (key or "").strip()
    if not key:
        raise UsageError(
            "no API key: pass --api-key or set CONTROL_PLANE_API_KEY (the control plane prints where it generated one)"
        )
    if not key.isprintable() or not key.isascii() or " " in key:
        raise UsageError(f"the API key from {key_source} holds a space, line break or other character keys never hold")
    ca_file = args.ca_file or os.environ.get("CONTROL_PLANE_CA_FILE")
    context = None
    if ca_file:
        import ssl

        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot use the CA file {ca_file}: {exc}") from None
    return ApiClient(url, key, ssl_context=context)


def load_documents(path: str) -> list[Any]:
    """Connector documents from a YAML (several documents allowed) or JSON file, or ``-`` for stdin."""
    from agent._files import NotUtf8Text, decode_utf8, read_text

    try:
        text = decode_utf8(sys.stdin.buffer.read(), "stdin") if path == "-" else read_text(Path(path))
    except NotUtf8Text as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    import yaml

    from agent._yaml import load_all

    try:
        docs = [d for d in load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML or JSON: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise UsageError(f"{path} nests too deeply to be a connector") from None
    if not docs:
        raise UsageError(f"{path} holds no document")
    return docs


#: What ``apply -f DIR`` reads from a directory (not its subdirectories), in name order.
CONNECTOR_SUFFIXES = (".yaml", ".yml", ".json")


def connector_files(paths: Sequence[str]) -> list[str]:
    """The files an apply reads: each ``-f`` as given, a directory's connector files sorted by name."""
    files: list[str] = []
    for path in paths:
        if path != "-" and Path(path).is_dir():
            found = sorted(str(f) for f in Path(path).iterdir() if f.suffix in CONNECTOR_SUFFIXES and f.is_file())
            if not found:
                raise UsageError(f"{path} holds no {', '.join('*' + s for s in CONNECTOR_SUFFIXES)} file")
            files.extend(found)
        else:
            files.append(path)
    return files


def _document_label(source: str, number: int, document: Any) -> str:
    """Where a document is, and what it names itself: ``a.yaml document 2 (identifier prod)``."""
    where = f"{'stdin' if source == '-' else source} document {number}"
    spec = document.get("connector") if isinstance(document, dict) else None
    if isinstance(spec, dict) and isinstance(spec.get("identifier"), str):
        return f"{where} (identifier {spec['identifier']})"
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        return f"{where} (name {spec['name']!r})"
    return where


def cmd_connector_apply(args: argparse.Namespace) -> int:
    """Apply every document of every file, or none: all are validated by the control plane first.

    One document needs no separate check (its apply is already all or nothing); with several, each
    goes through the apply route with ``dryRun=true`` (the server's own parser, so the client
    imports no AWS code), and one identifier in two documents is refused as well.
    """
    import msgspec

    from agent.protocol.errors import RequestRejected

    client = _client(args)
    documents: list[tuple[str, Any]] = []
    unreadable: list[str] = []
    for source in connector_files(args.file):
        try:
            docs = load_documents(source)
        except UsageError as exc:
            unreadable.append(str(exc))
            continue
        documents.extend((_document_label(source, n, d), d) for n, d in enumerate(docs, 1))
    problems: list[tuple[str, str, Sequence[Any]]] = [(m, "", ()) for m in unreadable]
    if len(documents) > 1 or unreadable:
        seen: dict[str, str] = {}
        for label, doc in documents:
            try:
                preview = client.apply_connector(doc, dry_run=True)
            except RequestRejected as exc:
                problems.append((label, exc.message, exc.problems))
                continue
            if preview.identifier in seen:
                problems.append((label, f"the identifier {preview.identifier} is also {seen[preview.identifier]}", ()))
            seen.setdefault(preview.identifier, label)
    total = len(documents) + len(unreadable)
    if problems:
        summary = f"nothing applied: {len(problems)} problem(s) in {total} document(s)" if total > 1 else ""
        return _print_apply_problems(problems, summary)
    results: list[ApplyResult] = []
    for label, doc in documents:
        try:
            result = client.apply_connector(doc)
        except RequestRejected as exc:  # the dry run passed: only a server changed meanwhile gets here
            summary = f"{len(results)} of {total} document(s) were applied before this one" if results else ""
            return _print_apply_problems([(label, exc.message, exc.problems)], summary)
        results.append(result)
        if args.output != "json":
            print(f"connector/{result.identifier} {result.outcome}")
        for warning in result.warnings:
            _err(f"warning: connector/{result.identifier}: {warning}")
    if args.output == "json":
        _print_json([msgspec.to_builtins(r) for r in results])
    return EXIT_OK


def _print_apply_problems(problems: Sequence[tuple[str, str, Sequence[Any]]], summary: str) -> int:
    """Each document's problems under its label, then the summary line (if any); exit code 2.

    With ``-o json``, one error object: the summary (or the one document's message), and every
    problem with its document's label in front of its field.
    """
    if _Errors.as_json:
        from agent.protocol.models import Problem

        flat: list[Problem] = []
        for label, message, details in problems:
            flat += [Problem(field=f"{label}: {p.field}", message=p.message) for p in details] or [
                Problem(field=label, message=message)
            ]
        _err(summary or (f"{problems[0][0]}: {problems[0][1]}" if problems[0][1] else problems[0][0]), flat)
        return EXIT_USAGE
    for label, message, details in problems:
        _err(f"{label}: {message}" if message else label, details)
    if summary:
        _err(summary)
    return EXIT_USAGE


def cmd_connector_get(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from agent._connector_text import connector_yaml

    record = _client(args).get_connector(args.identifier)
    if args.output == "json":
        _print_json(record)
    else:
        print(connector_yaml(record, datetime.now(UTC), lambda text: _paint(text, sys.stdout)))
    return EXIT_OK


def cmd_connector_list(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    import msgspec

    records = _client(args).list_connectors().connectors
    if args.output == "json":
        _print_json([msgspec.to_builtins(r) for r in records])
        return EXIT_OK
    now = datetime.now(UTC)
    rows = []
    for r in records:
        spec = r.connector.get("connector", {}).get("spec", {})
        cred = spec.get("credential", {})
        last = r.last_test
        rows.append(
            [
                r.identifier,
                cred.get("type"),
                cred.get("region", "us-east-1"),
                ",".join(spec.get("delegateSelectors", [])) or "(any)",
                "platform" if spec.get("executeOnDelegate") is False else "delegate",
                f"{last.status} {last.tested_at:%H:%M:%S}" + (" (stale)" if last.stale else "") if last else "-",
                health_summary(r.health, now),
            ]
        )
    _print_table(rows, ["identifier", "credential", "region", "selectors", "runs on", "last test", "status"])
    return EXIT_OK


def cmd_connector_history(args: argparse.Namespace) -> int:
    history = _client(args).connector_history(args.identifier, args.limit)
    if args.output == "json":
        _print_json(history)
        return EXIT_OK
    rows = [
        [
            f"{_utc(e.tested_at):%Y-%m-%d %H:%M:%S}Z",
            e.status,
            e.trigger,
            e.delegate_name,
            _milliseconds(e.duration_ms),
            _one_line(e.error_summary or "", HISTORY_ERROR_WIDTH),
        ]
        for e in history.entries
    ]
    _print_table(rows, ["tested at", "status", "trigger", "delegate", "duration", "error"])
    if not rows:
        print(f"(connector {history.identifier} has no finished tests yet)", file=sys.stderr)
    return EXIT_OK


# --- connector health, as people read it -------------------------------------------------------

#: Characters of a test's error summary in a `connector history` row (the JSON output has all of it).
HISTORY_ERROR_WIDTH = 80


def health_summary(health: ConnectorHealth, now: datetime) -> str:
    """The STATUS cell of ``connector list``: the status word first (it is coloured), then the gist.

    ``SUCCESS 4m ago``; ``FAILURE 3x since 10:42: assume_role_denied`` (tests failed in a row, since
    when in local time, the failure's category); ``UNKNOWN never tested``; `` (testing)`` at the end
    while a test of the connector is queued or running.
    """
    if health.status == "FAILURE":
        text = f"FAILURE {max(health.failures_in_row, 1)}x"
        if health.failing_since is not None:
            text += f" since {_local_clock(health.failing_since, now)}"
        reason = health.failure.category if health.failure else _one_line(health.error_summary or "", 40)
        text += f": {reason}" if reason else ""
    elif health.tested_at is not None:
        text = f"{health.status} {_ago(health.tested_at, now)}"
    else:
        text = "UNKNOWN" if health.testing else "UNKNOWN never tested"
    return text + (" (testing)" if health.testing else "")


def print_health(
    health: ConnectorHealth, now: datetime, out: TextIO | None = None, *, extra: Sequence[tuple[str, str]] = ()
) -> None:
    """The health block of ``connector get``, as YAML comments so the output still applies as it is.

    ``extra`` lines (label, text) follow, aligned with the rest.
    """
    from agent._connector_text import comment_block, health_lines

    out = out or sys.stdout
    for line in comment_block(health_lines(health, now, extra), lambda text: _paint(text, out)):
        print(line, file=out)


# The words for times live in agent._connector_text (the console says them too); loaded when first used,
# so `delegate-agent --help` imports nothing it does not need.


def _utc(when: datetime) -> datetime:
    from agent._connector_text import utc

    return utc(when)


def _ago(when: datetime, now: datetime) -> str:
    from agent._connector_text import ago

    return ago(when, now)


def _one_line(text: str, width: int) -> str:
    from agent._connector_text import one_line

    return one_line(text, width)


def _local_clock(when: datetime, now: datetime) -> str:
    """Local ``HH:MM`` when ``when`` is today here, else its local date."""
    local = _utc(when).astimezone()
    return f"{local:%H:%M}" if local.date() == _utc(now).astimezone().date() else f"{local:%Y-%m-%d}"


def _milliseconds(ms: int | None) -> str | None:
    if ms is None:
        return None
    return f"{ms} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def cmd_connector_delete(args: argparse.Namespace) -> int:
    _client(args).delete_connector(args.identifier)
    print(f"connector/{args.identifier} deleted")
    return EXIT_OK


def cmd_connector_test(args: argparse.Namespace) -> int:
    from agent.protocol.models import TestRequest

    client = _client(args)
    perms = list(args.permission or [])
    try:
        # waitSeconds 0: the task id comes back at once, so an interrupted wait can still name it.
        _, task = client.test_connector(args.identifier, TestRequest(wait_seconds=0, permissions=perms))
    except KeyboardInterrupt:
        _err(
            "interrupted before the control plane answered; the test may be queued: "
            f"delegate-agent tasks list --connector {args.identifier}"
        )
        return EXIT_INTERRUPTED
    return _await_and_report(client, task, args.timeout, args.output)


def _await_and_report(client: ApiClient, task: TaskView, timeout: float, output: str) -> int:
    """Wait up to ``timeout`` for the task (progress on a TTY), print it, exit by its outcome.

    Exit 0 SUCCESS, 1 FAILURE, 4 still unfinished (with how to fetch it later), 130 on Ctrl-C
    (the task keeps running; its id and how to fetch or cancel it are printed).
    """
    progress = _Progress() if timeout > 0 and sys.stderr.isatty() else None
    try:
        task = _wait_for_task(client, task, timeout, progress)
    except KeyboardInterrupt:
        _err(
            f"interrupted: task {task.task_id} keeps running. Fetch its result with "
            f"`delegate-agent tasks get {task.task_id} --wait 60`, or stop it with "
            f"`delegate-agent tasks cancel {task.task_id}`"
        )
        return EXIT_INTERRUPTED
    _print_task(task, output)
    if task.state != "done":
        where = f" on {task.delegate_name}" if task.state == "running" and task.delegate_name else ""
        fetch = f"`delegate-agent tasks get {task.task_id} --wait 60`"
        if timeout > 0:
            _err(
                f"no result within {timeout:g}s: task {task.task_id} is still {task.state}{where}. "
                f"Fetch it later with {fetch}"
            )
        else:
            _err(f"task {task.task_id} is still {task.state}{where}; {fetch} waits for its result")
        return EXIT_PENDING
    return EXIT_OK if task.status == "SUCCESS" else EXIT_FAILED


#: How long one request waits for a task to finish: short on a TTY, so state changes show.
_WAIT_STEP_TTY = 1.0
_WAIT_STEP = 30.0


def _wait_for_task(client: ApiClient, task: TaskView, timeout: float, progress: _Progress | None) -> TaskView:
    """The task once done, or as it is after ``timeout`` seconds; long-polls ``GET /tasks/{id}?wait=``."""
    deadline = time.monotonic() + timeout
    step = _WAIT_STEP_TTY if progress else _WAIT_STEP
    while True:
        if progress:
            progress.show(task)
        remaining = deadline - time.monotonic()
        if task.state == "done" or remaining <= 0:
            return task
        task = client.get_task(task.task_id, wait=min(step, remaining))


class _Progress:
    """One line on stderr each time a task changes state: queued -> running on DELEGATE -> done."""

    def __init__(self) -> None:
        self._last: tuple[str, str | None] | None = None
        self._start = time.monotonic()

    def show(self, task: TaskView) -> None:
        now = (task.state, task.delegate_name)
        if now == self._last:
            return
        self._last = now
        if task.state == "queued":
            tags = ", ".join(task.selectors)
            line = f"queued: waiting for a delegate with tags {tags}" if tags else "queued: waiting for a delegate"
        elif task.state == "running":
            attempt = f" (attempt {task.attempts})" if task.attempts > 1 else ""
            line = f"running on {task.delegate_name or 'a delegate'}{attempt}"
        else:
            line = f"done: {task.status or '-'}"
        print(f"task {task.task_id} {line}  [{time.monotonic() - self._start:.1f}s]", file=sys.stderr, flush=True)


def _print_task(task: TaskView, output: str) -> None:
    if output == "json":
        _print_json(task)
    elif task.state == "done":
        print_test_result(
            task.result,
            task_id=task.task_id,
            status=task.status,
            delegate_name=task.delegate_name,
            failure_reason=task.failure_reason,
        )
    else:
        print(f"{task.state.upper()}  task {task.task_id}  delegate {task.delegate_name or '-'}")


def print_test_result(
    result: ValidationResult | None,
    *,
    task_id: str,
    status: str | None,
    delegate_name: str | None,
    failure_reason: str | None = None,
    out: TextIO | None = None,
) -> None:
    """A human summary of a connection test: who, where, which step, why, and what to do."""
    out = out or sys.stdout
    status = status or "PENDING"
    print(f"{_paint(status, out)}  task {task_id}  delegate {delegate_name or '-'}", file=out)
    if result is None:
        if status not in {"SUCCESS", "PENDING"}:
            print(f"  error:     {failure_reason or 'unknown'}", file=out)
        return
    if result.identity is not None:
        print(f"  identity:  {result.identity.arn or '-'} (account {result.identity.account or '-'})", file=out)
    if result.test_region:
        print(
            f"  region:    {result.test_region} ({result.partition or 'aws'})  credentials: "
            f"{result.credential_source or '-'}",
            file=out,
        )
    marks = {"SUCCESS": "ok", "FAILURE": "FAILED", "SKIPPED": "skipped"}
    for step in result.steps:
        print(f"  step {step.name:<22} {_paint(f'{marks[step.status]:<8}', out)} {step.duration_ms:>6} ms", file=out)
    failure = result.failure
    if status != "SUCCESS":
        print(f"  error:     {result.error_summary or failure_reason or 'unknown'}", file=out)
        if failure is not None:
            code = failure.aws_error_code
            print(
                f"  failed at: {failure.step} ({failure.category}" + (f", AWS {code}" if code else "") + ")", file=out
            )
            if failure.hint:
                print(f"  hint:      {failure.hint}", file=out)
    check = result.permission_check
    if check is not None:
        denied = ", ".join(f"{d.action} ({d.decision})" for d in check.denied)
        print(f"  permissions: {len(check.allowed)} allowed" + (f"; denied: {denied}" if denied else ""), file=out)


def cmd_tasks_get(args: argparse.Namespace) -> int:
    client = _client(args)
    return _await_and_report(client, client.get_task(args.task_id), args.wait, args.output)


def cmd_tasks_list(args: argparse.Namespace) -> int:
    import msgspec

    tasks = _client(args).list_tasks(state=args.state, connectorId=args.connector, limit=args.limit).tasks
    if args.output == "json":
        _print_json([msgspec.to_builtins(t) for t in tasks])
        return EXIT_OK
    rows = [
        [
            t.task_id,
            t.type,
            t.connector_id or "-",
            t.state,
            t.status or "-",
            t.delegate_name or "-",
            f"{t.created_at:%Y-%m-%d %H:%M:%S}Z",
            t.failure_reason or "",
        ]
        for t in tasks
    ]
    _print_table(rows, ["id", "type", "connector", "state", "status", "delegate", "created", "reason"])
    return EXIT_OK


def cmd_tasks_cancel(args: argparse.Namespace) -> int:
    task = _client(args).cancel_task(args.task_id)
    if args.output == "json":
        _print_json(task)
    elif task.state == "done" and task.failure_reason == "cancelled":
        print(f"task {task.task_id} cancelled")
    elif task.state == "done":
        print(f"task {task.task_id} had already finished: {task.status}")
    else:
        print(f"task {task.task_id}: cancel requested; {task.delegate_name or 'its delegate'} stops it shortly")
    return EXIT_OK


def fold_delegates(delegates: Sequence[DelegateView]) -> list[tuple[DelegateView, int]]:
    """Fold restarts: each name's connected instances, else its newest; with how many gone ones each hides.

    A restart registers a new instance under the same name and leaves the old one deregistered or
    lost. Connected instances (replicas sharing a name) are all shown; the gone instances of a name
    are counted on its first row shown instead of listed.
    """
    by_name: dict[str, list[DelegateView]] = {}
    for d in delegates:
        by_name.setdefault(d.name, []).append(d)
    rows: list[tuple[DelegateView, int]] = []
    for name in sorted(by_name):
        group = sorted(by_name[name], key=lambda d: d.registered_at, reverse=True)
        shown = [d for d in group if d.state in ("running", "draining")] or group[:1]
        rows.extend((d, len(group) - len(shown) if i == 0 else 0) for i, d in enumerate(shown))
    return rows


def cmd_delegates_list(args: argparse.Namespace) -> int:
    import msgspec

    delegates = _client(args).list_delegates().delegates
    rows = [(d, 0) for d in delegates] if args.all else fold_delegates(delegates)
    if args.output == "json":
        _print_json([msgspec.to_builtins(d) for d, _ in rows])
        return EXIT_OK
    now = time.time()
    table = [
        [
            d.name,
            d.delegate_id,
            d.hostname,  # the pod: replicas of one install share the name (a delegate group)
            ",".join(d.tags),
            d.state,
            f"{d.in_flight}/{d.capacity}",
            d.version,
            f"{now - d.last_heartbeat_at.timestamp():.0f}s ago",
            older or "",
        ]
        for d, older in rows
    ]
    _print_table(table, ["name", "id", "host", "tags", "state", "busy", "version", "last heartbeat", "older"])
    hidden = sum(older for _, older in rows)
    if hidden:
        print(
            f"({hidden} older instance(s) of restarted delegates not shown: `delegates list --all` lists them, "
            "`delegates forget ID` removes one)",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_delegates_forget(args: argparse.Namespace) -> int:
    _client(args).forget_delegate(args.delegate_id, force=args.force)
    print(f"delegate {args.delegate_id} forgotten")
    return EXIT_OK


def cmd_tokens_list(args: argparse.Namespace) -> int:
    import msgspec

    tokens = _client(args).list_tokens().tokens
    if args.output == "json":
        _print_json([msgspec.to_builtins(t) for t in tokens])
        return EXIT_OK
    _print_table(
        [[t.name, t.token_id, "revoked" if t.revoked else "active", t.source, _scope_text(t)] for t in tokens],
        ["name", "id", "state", "source", "scope"],
    )
    return EXIT_OK


def _scope_text(token: TokenView) -> str:
    """``names=a-*|b tags=eks`` as in the token file, or ``any`` for a token without a scope."""
    parts = [f"{key}={'|'.join(value)}" for key, value in (("names", token.names), ("tags", token.tags)) if value]
    return " ".join(parts) or "any"


def _patterns(text: str | None) -> list[str] | None:
    return None if text is None else [p.strip() for p in text.replace("|", ",").split(",")]


def cmd_tokens_create(args: argparse.Namespace) -> int:
    created = _client(args).create_token(args.name, names=_patterns(args.names), tags=_patterns(args.tags))
    if args.output == "json":
        _print_json(created)
    else:
        print(created.token)
    print(
        f"token {created.name} ({created.token_id}) created. This is the only time its value is shown: "
        "give it to the delegates now (DELEGATE_TOKEN or DELEGATE_TOKEN_FILE).",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    t = _client(args).revoke_token(args.name, force=args.force)
    print(f"token {t.name} ({t.token_id}) revoked")
    return EXIT_OK


# --- the daemon ----------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> tuple[AgentSettings, AwsEnvironment]:
    """The delegate's settings and the AWS environment for its handler; every problem in either at once."""
    from agent.runtime.settings import ConfigError

    config = args.config or os.environ.get("AGENT_CONFIG_FILE")
    try:
        return delegate_config(os.environ, Path(config) if config else None)
    except ConfigError as exc:
        problems = exc.problems
    if len(problems) == 1:  # one line, as every other single mistake is
        _err(f"{problems[0].field}: {problems[0].message}")
        raise SystemExit(EXIT_USAGE)
    raise SystemExit(_print_problems(f"the configuration has {len(problems)} problem(s):", problems))


def delegate_config(environ: Mapping[str, str], config: Path | None = None) -> tuple[AgentSettings, AwsEnvironment]:
    """Parse the delegate's settings and the AWS environment, and apply the settings that concern AWS.

    The delegate's proxy (Harness's PROXY_*, with NO_PROXY) carries every AWS call; the AWS
    timeouts come from the settings. Raises ``ConfigError`` with the problems of both.
    """
    from dataclasses import replace

    from agent.aws.environment import AwsEnvironment
    from agent.runtime.settings import ConfigError, load_settings

    settings: AgentSettings | None = None
    problems: list[Problem] = []
    try:
        settings = load_settings(environ, config)
    except ConfigError as exc:
        problems.extend(exc.problems)
    aws, aws_problems = AwsEnvironment.from_environ(environ)
    problems.extend(aws_problems)
    if settings is None or problems:
        raise ConfigError(problems)
    aws = replace(aws, connect_timeout=settings.aws_connect_timeout, read_timeout=settings.aws_read_timeout)
    return settings, _through_proxy(settings, aws)


def _through_proxy(settings: AgentSettings, aws: AwsEnvironment) -> AwsEnvironment:
    """Every AWS call through the delegate's proxy (Harness's PROXY_*), if one is set."""
    if settings.proxy_url is None:
        return aws
    return aws.through_proxy(
        settings.proxy_url, user=settings.proxy_user, password=settings.proxy_password, no_proxy=settings.no_proxy
    )


def trust_additional_cas(settings: AgentSettings, aws: AwsEnvironment, directory: Path | None = None) -> AwsEnvironment:
    """AWS calls trust ADDITIONAL_CERTS_PATH too: botocore takes one bundle, written to ``directory``
    (a new private temporary directory by default). Only ``run`` does this; check-config writes nothing."""
    import tempfile

    if settings.additional_ca_path is None:
        return aws
    return aws.trusting(settings.additional_ca_path, directory or Path(tempfile.mkdtemp(prefix="delegate-agent-ca-")))


def environment_lines(environ: Mapping[str, str], settings: AgentSettings) -> list[str]:
    """What check-config says about the environment: what each variable set, what was set in vain."""
    from agent.runtime.settings import environment_report

    lines = environment_report(environ).lines()
    if settings.proxy_url is not None:
        lines += [f"{name} is overridden by PROXY_HOST" for name in _STANDARD_PROXIES if environ.get(name)]
        proxy = settings.control_plane_proxy()
        lines.append(
            f"the control plane is reached through the proxy {proxy}"
            if proxy
            else "the control plane is reached directly (PROXY_MANAGER=false or NO_PROXY)"
        )
    return lines


_STANDARD_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")


def build_handlers(
    aws: AwsEnvironment,
    redactor: Redactor,
    metrics: AgentMetrics,
    *,
    secrets_dir: Path | None = None,
    capacity: int = 16,
) -> list[TaskHandler]:
    """The task handlers this delegate runs (wired here, in one place)."""
    from agent.aws.clients import AwsClients
    from agent.aws.handler import AwsValidationHandler
    from agent.aws.secrets import SecretStore
    from agent.aws.validator import AwsValidator

    validator = AwsValidator(
        aws,
        AwsClients(aws, pool_connections=max(10, capacity)),
        SecretStore(secrets_dir, on_read=redactor.add),
        redact=redactor.value,
        observer=metrics.observe_aws_step,
    )
    return [AwsValidationHandler(validator)]


def build_agent(
    settings: AgentSettings,
    aws: AwsEnvironment,
    environ: Mapping[str, str],
    *,
    redactor: Redactor,
    watchdog: bool = True,
) -> Agent:
    """The delegate as ``run`` wires it: handlers, metrics, the task signature check (one place)."""
    from agent.observability.metrics import AgentMetrics
    from agent.runtime.agent import Agent
    from agent.runtime.settings import environment_report
    from agent.runtime.signing import task_check_from_key

    metrics = AgentMetrics(name=settings.name)
    return Agent(
        settings,
        handlers=build_handlers(aws, redactor, metrics, secrets_dir=settings.secrets_dir, capacity=settings.capacity),
        redactor=redactor,
        metrics=metrics,
        task_check=task_check_from_key(settings.control_plane.task_public_key),
        watchdog=watchdog,
        unused_env=environment_report(environ).ignored,
    )


def cmd_run(args: argparse.Namespace) -> int:
    # Before aiohttp loads it: frozenlist's C extension is C++ and maps the C++ runtime, 1 MiB of a
    # delegate's idle memory, for the few lists aiohttp freezes at start-up; its pure-Python twin
    # does the same work (docs/performance.md, issue 20). Set to an empty value to keep the extension.
    os.environ.setdefault("FROZENLIST_NO_EXTENSIONS", "1")
    import asyncio
    import errno

    from agent._files import DataDirUnusable
    from agent.observability.logging import Redactor, configure_logging
    from agent.runtime.agent import serve

    settings, aws = _settings(args)
    aws = trust_additional_cas(settings, aws)
    redactor = Redactor()
    configure_logging(
        fmt=settings.log_format,
        level=settings.log_level,
        redactor=redactor,
        static={"delegate": settings.name},
        cache=True,  # configured once for the life of the process
    )
    agent = build_agent(settings, aws, os.environ, redactor=redactor)

    try:
        return asyncio.run(serve(agent))
    except DataDirUnusable as exc:
        _err(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            _err(f"cannot listen on {settings.http_listen} (AGENT_HTTP_LISTEN): {_os_reason(exc)}")
        else:
            _err(f"cannot start: {_os_reason(exc)}")
        return EXIT_USAGE


def cmd_check_config(args: argparse.Namespace) -> int:
    import yaml

    settings, _ = _settings(args)
    print(yaml.safe_dump(settings.describe(), sort_keys=False).rstrip())
    for line in environment_lines(os.environ, settings):
        print(f"delegate-agent: {line}", file=sys.stderr)
    print("configuration OK", file=sys.stderr)
    return EXIT_OK


# --- local validation --------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    """Run the connection test here, without a control plane: the quickest way to debug a connector."""
    import asyncio

    from agent.aws.clients import AwsClients
    from agent.aws.connector import ConnectorInvalid, parse_actions, parse_connector
    from agent.aws.environment import AwsEnvironment
    from agent.aws.secrets import DELEGATE_SECRETS, SecretsPlace, SecretStore
    from agent.aws.validator import AwsValidator
    from agent.observability.logging import Redactor, configure_logging
    from agent.runtime.settings import ConfigError, load_proxy_settings

    redactor = Redactor()
    configure_logging(fmt=args.log_format, level="warning", redactor=redactor)
    docs = load_documents(args.file)
    if len(docs) != 1:
        raise UsageError(f"{args.file} holds {len(docs)} documents; validate one connector at a time")
    try:
        connector = parse_connector(docs[0])
        permissions = parse_actions(None, args.permission, "--permission") if args.permission else ()
    except ConnectorInvalid as exc:
        return _print_problems(f"{args.file} is not a valid connector:", exc.problems)
    for notice in connector.notices:
        _err(f"notice: {notice}")
    env, problems = AwsEnvironment.from_environ(os.environ)
    try:  # the delegate's proxy (PROXY_*), so a test run here takes the delegate's path to AWS
        proxy = load_proxy_settings(os.environ)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        return _print_problems(f"the AWS environment has {len(problems)} problem(s):", problems)
    env = _through_proxy(proxy, env)
    for secret in proxy.secrets():
        redactor.add(secret)
    secrets_dir = args.secrets_dir or os.environ.get("AGENT_SECRETS_DIR")
    # Hints name the setting the user actually gave: the flag here, the delegate's variable otherwise.
    place = (
        SecretsPlace(owner="this command", setting="--secrets-dir", store=f"--secrets-dir {args.secrets_dir}")
        if args.secrets_dir
        else DELEGATE_SECRETS
    )
    secrets = SecretStore(Path(secrets_dir) if secrets_dir else None, on_read=redactor.add, place=place)

    async def run() -> ValidationResult:
        clients = AwsClients(env)
        try:
            validator = AwsValidator(env, clients, secrets, redact=redactor.value)
            return await validator.validate(
                connector,
                task_id="local",
                delegate_id=None,
                delegate_name=os.environ.get("DELEGATE_NAME") or "local",
                permissions=permissions,
                timeout=args.timeout,
            )
        finally:
            await clients.close()

    result = asyncio.run(run())
    if args.output == "json":
        _print_json(result)
    else:
        print_test_result(result, task_id="(local)", status=result.status, delegate_name="this machine")
    return EXIT_OK if result.status == "SUCCESS" else EXIT_FAILED


# --- parser ------------------------------------------------------------------------------------


def _positive(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return v


def _non_negative(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return v


def _limit(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number from 1 to 1000")
    return int(value)


def _history_limit(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 500:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number from 1 to 500")
    return int(value)


def _connections(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 100_000:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number from 1 to 100000")
    return int(value)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as JSON on stderr when ``-o json`` was asked for."""

    def error(self, message: str) -> NoReturn:
        if not _Errors.as_json:
            super().error(message)
        _err(f"{message} (see {self.prog} --help)", code="usage")
        sys.exit(EXIT_USAGE)


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether ``-o json`` is among the arguments, judged before (and whether or not) they parse."""
    pairs = zip(argv, [*argv[1:], ""], strict=True)
    return any(a in ("-ojson", "--output=json") or (a in ("-o", "--output") and b == "json") for a, b in pairs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="delegate-agent",
        description="A delegate that validates AWS connectors "
        "from inside your cluster, and its reference control plane.",
    )
    parser.add_argument("--version", action="version", version=f"delegate-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    client_opts = argparse.ArgumentParser(add_help=False)
    client_opts.add_argument(
        "--control-plane",
        metavar="URL",
        help=f"control plane URL (env CONTROL_PLANE_URL; default {DEFAULT_CONTROL_PLANE})",
    )
    client_opts.add_argument("--api-key", metavar="KEY", help="API key (env CONTROL_PLANE_API_KEY)")
    client_opts.add_argument(
        "--ca-file", metavar="FILE", help="CA bundle for an HTTPS control plane (env CONTROL_PLANE_CA_FILE)"
    )
    client_opts.add_argument("-o", "--output", choices=["table", "json"], default="table", help="output format")

    for register in _COMMANDS:
        register(sub, client_opts)
    return parser


def _add_control_plane(sub: Any, _: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "control-plane",
        help="run the reference control plane",
        description="Serve the delegate protocol (/v1) and the connector API (/api/v1) until SIGTERM or "
        "Ctrl-C. State lives in SQLite in --data-dir; credentials not given are generated there (mode 0600).",
    )
    p.add_argument(
        "--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="address to serve on (default: %(default)s)"
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where the SQLite state and generated credentials live; created if absent (default: none; one of "
        "--data-dir and --database is required)",
    )
    p.add_argument(
        "--database",
        metavar="URL",
        help="keep the state in Postgres instead (postgresql://USER:PASSWORD@HOST:5432/DB), shared by several "
        "replicas; add ?pgbouncer=transaction behind PgBouncer in transaction mode; credentials must then be given, "
        "not generated (default: CONTROL_PLANE_DATABASE_URL; else SQLite in --data-dir)",
    )
    p.add_argument(
        "--database-listen-url",
        metavar="URL",
        help="a direct Postgres URL (session mode) for wakeups between replicas when --database goes through "
        "PgBouncer (default: CONTROL_PLANE_DATABASE_LISTEN_URL; else --database)",
    )
    p.add_argument(
        "--connector-test-interval",
        type=_interval,
        default="30m",
        metavar="DURATION",
        help="re-test every connector this often (30m, 2h, 0 for never); a connector's own testInterval wins; "
        "a connector failing the same way backs off to 6h (default: %(default)s, Harness's connector heartbeat)",
    )
    p.add_argument(
        "--connector-history",
        type=_history_count,
        default=50,
        metavar="N",
        help="finished tests kept per connector, for `connector history` (default: %(default)s)",
    )
    p.add_argument(
        "--status-webhook",
        metavar="URL",
        help="POST a JSON event here when a connector's status changes, retried with back-off "
        "(default: CONTROL_PLANE_STATUS_WEBHOOK; else none)",
    )
    p.add_argument(
        "--oidc-issuer",
        metavar="URL",
        help="be an OIDC identity provider at this public https URL (no port; AWS fetches the keys from "
        "URL/.well-known/): OidcAuthentication connectors then get a 5-minute token per test (docs/oidc.md) "
        "(default: CONTROL_PLANE_OIDC_ISSUER; else none)",
    )
    p.add_argument(
        "--oidc-key-file",
        metavar="FILE",
        help="the OIDC signing keys (JSON; `delegate-agent oidc rotate-key` makes and rotates it); required with "
        "--database (default: oidc-keys.json in the data dir, generated and rotated there)",
    )
    p.add_argument(
        "--oidc-key-days",
        type=_positive,
        default=30.0,
        metavar="DAYS",
        help="in the data dir, rotate the OIDC signing key when it is this old (default: %(default)g)",
    )
    p.add_argument(
        "--database-poll-seconds",
        type=_positive,
        default=1.0,
        metavar="S",
        help="with --database, how often a waiting long poll looks at the queue even if no wakeup arrived, "
        "the backstop for a missed LISTEN/NOTIFY (default: %(default)g)",
    )
    p.add_argument(
        "--delegate-token-file",
        metavar="FILE",
        help="accepted delegate tokens, one per line (name:token or token), optionally limited to delegate "
        "names and tags: 'team-a:TOKEN names=team-a-* tags=eks|prod'; a delegate stays bound to the token name "
        "it registered with; re-read when it changes (default: CONTROL_PLANE_DELEGATE_TOKENS, comma-separated; "
        "with neither, one is generated into the data dir)",
    )
    p.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="API keys for the connector API, one per line "
        "(default: CONTROL_PLANE_API_KEY; with neither, one is generated into the data dir)",
    )
    p.add_argument(
        "--secrets-dir",
        metavar="DIR",
        help="secrets for executeOnDelegate: false connectors, one file per secret reference (default: none)",
    )
    p.add_argument(
        "--task-signing-key-file",
        metavar="FILE",
        help="Ed25519 seed (base64) to sign tasks with (default: generated into the data dir as "
        "task-signing-key; the public key is in task-signing-key.pub and /v1/info)",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (chain) (default: plain HTTP)")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (default: in the --tls-cert file)")
    p.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="require delegates to present a certificate from this CA, for mutual TLS (default: not required)",
    )
    p.add_argument(
        "--audience",
        metavar="AUD",
        help=f"JWT audience delegates must sign their tokens for (default: {_DEFAULT_AUDIENCE})",
    )
    for flag, default, text in (
        ("--heartbeat-seconds", 10.0, "how often delegates are told to send a heartbeat"),
        ("--poll-wait-seconds", 20.0, "how long a delegate's long poll for a task is held open"),
        ("--lease-seconds", 30.0, "how long a taken task is a delegate's before it must renew the lease"),
        ("--pickup-timeout-seconds", 30.0, "how long a task waits for an eligible delegate before it fails"),
        ("--task-timeout-seconds", 120.0, "execution budget for one connection test, handed to the delegate"),
        ("--header-timeout-seconds", 10.0, "a new connection that has not sent its request head by then is closed"),
        ("--keepalive-timeout-seconds", 75.0, "an idle connection is closed after this long"),
        ("--clock-leeway-seconds", 60.0, "how far a delegate's clock may differ from this server's"),
    ):
        p.add_argument(flag, type=_positive, default=default, metavar="S", help=f"{text} (default: %(default)g)")
    p.add_argument(
        "--max-connections",
        type=_connections,
        default=512,
        metavar="N",
        help="open connections at most; over it the oldest one yet to send a request (or else idle between "
        "requests) is closed (default: %(default)s)",
    )
    p.add_argument(
        "--log-format",
        choices=["json", "console"],
        help="log line format (default: console on a terminal, json otherwise)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="least severe level logged (default: %(default)s)",
    )
    p.set_defaults(func=cmd_control_plane)


def _add_connector(sub: Any, client_opts: argparse.ArgumentParser) -> None:
    p = sub.add_parser("connector", help="manage connectors on the control plane")
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = csub.add_parser(
        "apply",
        parents=[client_opts],
        help="create or replace connectors from YAML/JSON files",
        description="All or nothing: with several documents (--- in a file, several -f, or a directory), "
        "the control plane validates every one first (a dry run), and if any is invalid none is applied; "
        "each problem names its file, document number and identifier. The same identifier in two "
        "documents is refused too. Exit 0 when applied, 2 when nothing was.",
    )
    a.add_argument(
        "-f",
        "--file",
        required=True,
        action="append",
        metavar="PATH",
        help="a file with one or more connector documents, - for stdin, or a directory "
        "(its *.yaml, *.yml and *.json files, in name order); repeat for more",
    )
    a.set_defaults(func=cmd_connector_apply)
    g = csub.add_parser("get", parents=[client_opts], help="show a connector, its health and its latest test")
    g.add_argument("identifier")
    g.set_defaults(func=cmd_connector_get)
    lst = csub.add_parser(
        "list",
        parents=[client_opts],
        help="list connectors with their connectivity status",
        description="STATUS is the connector's connectivity as the control plane keeps it: SUCCESS and "
        "how long ago it was tested; FAILURE, how many tests in a row failed, since when and why "
        "(the failure's category); UNKNOWN before the first test; (testing) while a test is queued or running.",
    )
    lst.set_defaults(func=cmd_connector_list)
    h = csub.add_parser(
        "history",
        parents=[client_opts],
        help="a connector's last test results, newest first",
        description="Each finished test of the connector: when, the result, what started it (scheduled, "
        "manual, or changed: the connector was applied with a new spec), the delegate, how long it took "
        "and the error. The control plane keeps the last results of each connector (50 by default).",
    )
    h.add_argument("identifier")
    h.add_argument(
        "--limit", type=_history_limit, default=50, metavar="N", help="at most N results (1-500; default 50)"
    )
    h.set_defaults(func=cmd_connector_history)
    d = csub.add_parser("delete", parents=[client_opts], help="delete a connector")
    d.add_argument("identifier")
    d.set_defaults(func=cmd_connector_delete)
    t = csub.add_parser(
        "test",
        parents=[client_opts],
        help="test the connection; exit 0 on SUCCESS, 1 on FAILURE, 4 when no result came in time",
        description="Queues a connection test on an eligible delegate and waits for its result. On a "
        "terminal, progress goes to stderr (queued -> running on DELEGATE -> done); nothing extra when "
        "piped. Exit codes: 0 SUCCESS; 1 FAILURE; 4 no result within --timeout (the task goes on: "
        "`delegate-agent tasks get ID` fetches it later); 130 Ctrl-C, which stops waiting but not the "
        "task (its id is printed; `delegate-agent tasks cancel ID` stops it).",
    )
    t.add_argument("identifier")
    t.add_argument(
        "--timeout", type=_positive, default=150.0, metavar="S", help="seconds to wait for the result (default 150)"
    )
    t.add_argument("--permission", action="append", metavar="ACTION", help="also check this IAM action (repeat)")
    t.set_defaults(func=cmd_connector_test)


def _add_tasks(sub: Any, client_opts: argparse.ArgumentParser) -> None:
    p = sub.add_parser("tasks", help="tasks on the control plane (connection tests and others)")
    tsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    g = tsub.add_parser(
        "get",
        parents=[client_opts],
        help="show a task and its result",
        description="Shows a task; with --wait, waits up to S seconds for it to finish (progress on a "
        "terminal). Exit codes as `connector test`: 0 SUCCESS, 1 FAILURE, 4 not finished yet, 130 Ctrl-C.",
    )
    g.add_argument("task_id", metavar="ID")
    g.add_argument("--wait", type=_non_negative, default=0.0, metavar="S", help="seconds to wait for it to finish")
    g.set_defaults(func=cmd_tasks_get)
    lst = tsub.add_parser("list", parents=[client_opts], help="list recent tasks, newest first")
    lst.add_argument("--state", choices=["queued", "running", "done"], help="only tasks in this state")
    lst.add_argument("--connector", metavar="IDENTIFIER", help="only this connector's tasks")
    lst.add_argument("--limit", type=_limit, default=100, metavar="N", help="at most N tasks (1-1000; default 100)")
    lst.set_defaults(func=cmd_tasks_list)
    c = tsub.add_parser(
        "cancel",
        parents=[client_opts],
        help="cancel a task",
        description="A queued task fails at once as cancelled; a running one is stopped by its delegate.",
    )
    c.add_argument("task_id", metavar="ID")
    c.set_defaults(func=cmd_tasks_cancel)


def _add_delegates(sub: Any, client_opts: argparse.ArgumentParser) -> None:
    p = sub.add_parser("delegates", help="delegates known to the control plane")
    dsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    lst = dsub.add_parser(
        "list",
        parents=[client_opts],
        help="list delegates: connected ones, and the newest gone instance of each name",
        description="States: running, draining, deregistered (stopped cleanly), lost (went silent). Restarts of "
        "one name are folded: the OLDER column counts the gone instances not shown.",
    )
    lst.add_argument("--all", action="store_true", help="list every instance, restarts included")
    lst.set_defaults(func=cmd_delegates_list)
    f = dsub.add_parser("forget", parents=[client_opts], help="remove a deregistered or lost delegate")
    f.add_argument("delegate_id", metavar="ID", help="the delegate's id (delegates list shows it)")
    f.add_argument("--force", action="store_true", help="also remove a connected one (if alive, it registers again)")
    f.set_defaults(func=cmd_delegates_forget)


def _add_oidc(sub: Any, _: argparse.ArgumentParser) -> None:
    p = sub.add_parser("oidc", help="the control plane's OIDC signing keys (--oidc-issuer)")
    osub = p.add_subparsers(dest="oidc_command", required=True, metavar="COMMAND")
    r = osub.add_parser(
        "rotate-key",
        help="add a new signing key to a key file (creating it)",
        description="Add a new RSA signing key. It is published at once and signs from 10 minutes later (once "
        "verifiers have refreshed their copy of the keys); the key it replaces stays published 10 minutes more, "
        "for its last tokens. Keys superseded longer ago are dropped. A running control plane re-reads the file "
        "within a second; with several replicas, put the new file into their Secret.",
    )
    r.add_argument(
        "--key-file", required=True, metavar="FILE", help="the key file (--oidc-key-file of the control plane)"
    )
    r.add_argument(
        "--immediately",
        action="store_true",
        help="sign with the new key at once (a key that leaked): tokens may fail until AWS refetches the keys",
    )
    r.set_defaults(func=cmd_oidc_rotate_key)


def cmd_oidc_rotate_key(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from agent.controlplane.oidc import OidcConfigError, rotate_key_file

    path = Path(args.key_file)
    try:
        key = rotate_key_file(path, immediately=args.immediately)
    except OidcConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _err(f"cannot write {path}: {_os_reason(exc)}")
        return EXIT_USAGE
    when = datetime.fromtimestamp(key.active_from, UTC).isoformat(timespec="seconds")
    print(f"{path}: new key {key.kid}, signing from {when}")
    return EXIT_OK


def _add_tokens(sub: Any, client_opts: argparse.ArgumentParser) -> None:
    p = sub.add_parser("tokens", help="delegate tokens the control plane accepts")
    tsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    lst = tsub.add_parser("list", parents=[client_opts], help="list tokens (fingerprints only)")
    lst.set_defaults(func=cmd_tokens_list)
    c = tsub.add_parser(
        "create", parents=[client_opts], help="create a delegate token; its value is printed once, on stdout"
    )
    c.add_argument("name", help="a name to revoke it by (letters, digits, '_', '.', '-')")
    c.add_argument(
        "--names",
        metavar="PATTERNS",
        help="limit it to these delegate names, comma-separated shell patterns (team-a-*); default any",
    )
    c.add_argument(
        "--tags",
        metavar="PATTERNS",
        help="limit it to these tags, comma-separated patterns; default any (with --names: only tags those allow)",
    )
    c.set_defaults(func=cmd_tokens_create)
    r = tsub.add_parser("revoke", parents=[client_opts], help="revoke a token by name or id")
    r.add_argument("name")
    r.add_argument("--force", action="store_true", help="revoke it even if it is the last active token")
    r.set_defaults(func=cmd_tokens_revoke)


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    return run_demo(keep_running=args.keep_running, workdir=Path(args.workdir) if args.workdir else None)


def _add_demo(sub: Any, _: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole story on this machine: AWS stand-in, control plane, two delegates",
        description="Starts moto (seeded, IAM enforced), the control plane and two delegate "
        "processes on 127.0.0.1, tests nine connectors and prints what happened. Exit 0 when "
        "every outcome is the expected one.",
    )
    p.add_argument("--keep-running", action="store_true", help="leave the stack up to try by hand; Ctrl-C stops it")
    p.add_argument("--workdir", metavar="DIR", help="keep the demo's files here instead of a temporary directory")
    p.set_defaults(func=cmd_demo)


def _add_run(sub: Any, _: argparse.ArgumentParser) -> None:
    for name, func, text in (
        ("run", cmd_run, "run the delegate (register, poll, validate, report)"),
        ("check-config", cmd_check_config, "check the delegate's configuration and exit"),
    ):
        p = sub.add_parser(
            name,
            help=text,
            description="Settings come from the YAML file and the environment "
            "(environment wins); see config/agent.yaml.",
        )
        p.add_argument("--config", metavar="FILE", help="YAML settings file (env AGENT_CONFIG_FILE)")
        p.set_defaults(func=func)


def _add_validate(sub: Any, _: argparse.ArgumentParser) -> None:
    p = sub.add_parser("validate", help="test a connector from this machine, without a control plane")
    p.add_argument("-f", "--file", required=True, help="the connector (Harness YAML or JSON), or - for stdin")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument("--secrets-dir", metavar="DIR", help="where secret references resolve (default AGENT_SECRETS_DIR)")
    p.add_argument("--permission", action="append", metavar="ACTION", help="also check this IAM action (repeat)")
    p.add_argument("--timeout", type=_positive, default=120.0, metavar="S", help="bound for the whole test")
    p.add_argument("--log-format", choices=["json", "console"])
    p.set_defaults(func=cmd_validate)


def cmd_completion(args: argparse.Namespace) -> int:
    from agent._completion import script

    print(script(build_parser(), args.shell), end="")
    return EXIT_OK


def _add_completion(sub: Any, _: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description='bash: eval "$(delegate-agent completion bash)" in ~/.bashrc. '
        'zsh: delegate-agent completion zsh > "${fpath[1]}/_delegate-agent", then start a new shell.',
    )
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete in")
    p.set_defaults(func=cmd_completion)


_COMMANDS: list[Callable[[Any, argparse.ArgumentParser], None]] = [
    _add_run,
    _add_control_plane,
    _add_connector,
    _add_tasks,
    _add_delegates,
    _add_tokens,
    _add_oidc,
    _add_validate,
    _add_demo,
    _add_completion,
]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``delegate-agent`` and ``python -m agent``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _Errors.as_json = _wants_json(argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # --help, --version and usage errors exit here, having imported nothing
    del parser  # the whole command tree: a daemon that runs for weeks need not keep it
    from agent.protocol.api_client import Unreachable
    from agent.protocol.errors import AuthError, ProtocolError, RequestRejected, TransientError

    try:
        return int(args.func(args))
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except Unreachable as exc:
        _err(str(exc))
        return EXIT_UNREACHABLE
    except AuthError as exc:
        _err(f"the control plane refused our credentials: {exc.message}")
        return EXIT_UNREACHABLE
    except TransientError as exc:
        _err(f"the control plane failed: {exc}")
        return EXIT_UNREACHABLE
    except ProtocolError as exc:
        _err(exc.message, exc.problems, exc.code)
        return EXIT_USAGE if isinstance(exc, RequestRejected) or (exc.status or 0) < 500 else EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
