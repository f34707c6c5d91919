"""A real Prometheus server on 127.0.0.1 for tests: start it on a config, query it, stop it by its PID.

The binary comes from tools/install-test-tools.sh (Debian's prometheus package). The first scrape
lands about 5 s after start even with a 1 s interval, so waits allow about 30 s.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import free_port


@dataclass
class Prometheus:
    base: str
    http: aiohttp.ClientSession
    log: Path

    async def query(self, expr: str) -> list[dict[str, Any]] | None:
        """The instant vector ``expr`` gives now, or None while Prometheus cannot answer yet."""
        try:
            async with self.http.get(self.base + "/api/v1/query", params={"query": expr}) as resp:
                body = await resp.json()
        except (aiohttp.ClientError, ValueError):
            return None
        assert body.get("status") == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, expr: str) -> float | None:
        """The one sample ``expr`` gives, or None while it gives none."""
        result = await self.query(expr)
        if not result:
            return None
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def tail(self) -> str:
        return self.log.read_text()[-2000:]


@asynccontextmanager
async def running_prometheus(tmp_path: Path, config: str, http: aiohttp.ClientSession) -> AsyncIterator[Prometheus]:
    """Prometheus on a free loopback port with ``config`` (checked by promtool first)."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: run tools/install-test-tools.sh (make test does)"
    path = tmp_path / "prometheus.yml"
    path.write_text(config)
    check = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=log,
            stderr=log,
        )
        try:
            yield Prometheus(f"http://127.0.0.1:{port}", http, log_path)
        finally:
            proc.terminate()
            await proc.wait()
