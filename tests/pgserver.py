"""A real PostgreSQL cluster on 127.0.0.1 for tests: initdb, start, stop, restart, a database per test.

The binaries come from Debian's ``postgresql`` package (tools/install-test-tools.sh installs it). As
root, initdb and pg_ctl refuse to run, so they run as the ``postgres`` user in a directory made for
it (pytest's own tmp dirs are root-only). The cluster trades durability for speed (fsync off): it
lives for one test session.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg

#: The user the cluster runs as when the tests run as root.
PG_USER = "postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bindir() -> Path | None:
    """Where initdb and pg_ctl are: ``pg_config --bindir`` when it has them, else the newest Debian version."""
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out and Path(out, "initdb").exists():
            return Path(out)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """One throwaway cluster: ``start()`` once, ``url(db)`` to connect, ``stop()`` removes everything."""

    def __init__(self, bindir: Path, port: int | None = None) -> None:
        self.bindir = bindir
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="delegate-agent-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.root, PG_USER, PG_USER)
        self._initialised = False

    def url(self, dbname: str = "postgres", *, password: str | None = None) -> str:
        auth = PG_USER if password is None else f"{PG_USER}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        if not self._initialised:
            self._run(
                "initdb", "-D", str(self.data), "-U", PG_USER, "--auth=trust",
                "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
            )  # fmt: skip
            self._initialised = True
        # -F: no fsync; the socket lives in the cluster's own dir, not /var/run/postgresql.
        options = f"-F -p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o", options, "start")

    def stop(self) -> None:
        """Stop the server at once (``-m fast``: clients are disconnected, as on a failover)."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", "fast", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """The server is down inside the block and up again after it, whatever the block raised."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    async def outage(self, seconds: float) -> None:
        """Stop the server for ``seconds`` (an outage of known length), then start it again.

        pg_ctl runs in a thread, so the event loop (and the stores under test) keep running.
        """
        await asyncio.to_thread(self.stop)
        try:
            await asyncio.sleep(seconds)
        finally:
            await asyncio.to_thread(self.start)

    def destroy(self) -> None:
        """Stop the server if it runs and remove its files."""
        if self._initialised:
            status = self._run("pg_ctl", "-D", str(self.data), "status", check=False)
            if status.returncode == 0:
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    async def create_database(self) -> str:
        """A new, empty database (from template0) and its URL."""
        name = "t_" + uuid.uuid4().hex[:16]
        conn = await asyncpg.connect(self.url(), timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await conn.close()
        return self.url(name)

    async def drop_database(self, url: str) -> None:
        """Drop a database made by :meth:`create_database`, closing whatever still uses it."""
        name = url.rsplit("/", 1)[1]
        conn = await asyncpg.connect(self.url(), timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / tool), *args]
        if self._as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        started = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=self.root, timeout=60)
        if check and done.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{tool} failed ({done.returncode}) after {time.monotonic() - started:.1f}s: "
                f"{done.stdout}{done.stderr}\n--- server log ---\n{tail}"
            )
        return done
