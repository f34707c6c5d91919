"""``make bench-instructions``: machine instructions per validation, layer by layer, in one process.

CPU time on this machine moves 20-40 % from one round to the next (a shared host), which hides any
change smaller than that unless it is measured many times. The count of instructions a process
executes does not move with the neighbours: valgrind counts them (cachegrind, no cache model). It
is not CPU time (a cache miss costs no instruction), so it checks a change to our own code, and
the canned rows of ``make bench`` stay the verdict. Each layer includes the one above:

- ``sdk``: the two calls as the validator makes them (the delegate's shared clients, the task's
  credentials bound per call);
- ``handler``: the whole AWS handler: the connector parsed, its secret read, credentials built,
  each step timed and counted, the result built and redacted, and the executor's redaction pass;
- ``executor``: the delegate's executor around it: its asyncio tasks, timeout, metrics, log line,
  and the result written to a real SQLite outbox (the reporter's delivery is not included).

Each layer runs twice in its own process under valgrind, warmed with 600 validations (every key
seen twice, as the delegate is in a steady state) and then N and 3N validations, 64 at a time; the
difference over 2N is per validation. Logging is configured as the benchmark's delegate has it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from bench import canned_aws, startup
from bench.decompose import bench_keys, connector, layer_rows, task_context
from bench.load import ROOT, _clean_env, free_port

LAYERS = ("sdk", "handler", "executor")
KEYS = 300
WARM = 600
WORKERS = 64


async def _layer(layer: str, count: int, url: str, secrets: Path, log: TextIO) -> None:
    """Run ``WARM`` then ``count`` validations of ``layer`` (the process is the one valgrind counts)."""
    from aiobotocore.credentials import AioCredentials  # noqa: PLC0415 - loaded in the counted process only

    from agent.aws.environment import AwsEnvironment  # noqa: PLC0415
    from agent.cli import build_handlers  # noqa: PLC0415
    from agent.observability.logging import Redactor, configure_logging  # noqa: PLC0415
    from agent.observability.metrics import AgentMetrics  # noqa: PLC0415
    from agent.protocol.models import TASK_TYPE_AWS_VALIDATE, Task  # noqa: PLC0415
    from agent.runtime.agent import GC_YOUNG_OBJECTS  # noqa: PLC0415
    from agent.runtime.executor import Executor, Slots  # noqa: PLC0415
    from agent.runtime.outbox import SqliteOutbox  # noqa: PLC0415
    from agent.runtime.state import AgentState  # noqa: PLC0415

    pairs = bench_keys(KEYS)
    env, problems = AwsEnvironment.from_environ({"AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"})
    if problems:
        raise RuntimeError(problems)
    redactor = Redactor()
    configure_logging(fmt="json", level="warning", redactor=redactor, stream=log, cache=True)
    [handler] = build_handlers(env, redactor, AgentMetrics(name="instructions"), secrets_dir=secrets, capacity=256)
    await handler.warm()
    clients = handler.validator.clients  # type: ignore[attr-defined]
    creds = AioCredentials(pairs[0][0], pairs[0][1])
    data = Path(tempfile.mkdtemp(prefix="delegate-instructions-"))
    outbox = SqliteOutbox(data / "outbox.db")
    slots = Slots(256)
    state = AgentState(name="i", tags=("bench",), capacity=256, instance_id="i", delegate_id="d", registered=True)
    executor = Executor(
        handlers={handler.task_type: handler},
        client=None,  # type: ignore[arg-type] # tasks end long before a lease renewal
        outbox=outbox,
        slots=slots,
        state=state,
        metrics=AgentMetrics(name="instructions-executor"),
        redact=redactor.value,
    )

    async def sdk(_: int) -> None:
        with clients.bound(creds):
            async with clients.client("sts", "us-east-1") as c:
                await c.get_caller_identity()
            async with clients.client("ec2", "us-east-1") as c:
                await c.describe_regions(RegionNames=["us-east-1"], AllRegions=True)

    async def run_handler(i: int) -> None:
        result = redactor.value(await handler(task_context(i, pairs)))
        if result.status != "SUCCESS":
            raise RuntimeError(f"a validation against the canned AWS failed: {result}")

    async def run_executor(i: int) -> None:
        now = datetime.now(UTC)
        task = Task(
            task_id=f"tsk_{i}",
            lease_id=f"lse_{i}",
            type=TASK_TYPE_AWS_VALIDATE,
            payload={"connector": connector(i, pairs)},
            created_at=now,
            lease_seconds=600,
            lease_expires_at=now,
            timeout_seconds=60,
            attempt=1,
        )
        slots.reserve(1)
        slots.claim(1)
        executor.start(task)
        run = executor._runs.get(task.task_id)
        if run is not None:
            await run.done.wait()
        if len(outbox) >= 64:  # as the reporter does once a batch is delivered
            delivered = outbox.pending()
            failed = [e.result.output for e in delivered if e.result.status != "SUCCESS"]
            if failed:
                raise RuntimeError(f"a validation against the canned AWS failed: {failed[0]}")
            outbox.remove_many([e.key for e in delivered])

    validate: Callable[[int], Awaitable[None]] = {"sdk": sdk, "handler": run_handler, "executor": run_executor}[layer]

    async def pool(n: int) -> None:
        numbers = iter(range(n))

        async def worker() -> None:
            for i in numbers:
                await validate(i)

        await asyncio.gather(*(worker() for _ in range(WORKERS)))

    await pool(WARM)
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])
    await pool(count)
    outbox.close()
    await handler.aclose()
    shutil.rmtree(data, ignore_errors=True)


def _count(valgrind: str, layer: str, n: int, url: str, secrets: Path) -> int:
    """Instructions of one process that runs ``WARM`` + ``n`` validations of ``layer``."""
    argv = [valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    argv += [sys.executable, "-m", "bench.instructions", "--run", layer, "--count", str(n), "--url", url]
    argv += ["--secrets", str(secrets)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=_clean_env(), check=False)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{layer} under valgrind failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return int(found.group(1).replace(",", ""))


def rows(per: dict[str, float]) -> list[tuple[str, ...]]:
    """One row per layer: instructions per validation, what it adds over the layer above, its ratio to ``sdk``."""
    what = {
        "sdk": "the two calls as the validator makes them",
        "handler": "the AWS handler, both redaction passes",
        "executor": "the executor around it, the SQLite outbox",
    }
    return layer_rows(per, what, unit="M", base="sdk", scale=1e-6, digits=3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="N: validations per measured difference")
    parser.add_argument("--run", choices=LAYERS, help=argparse.SUPPRESS)  # the counted process
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--secrets", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        with open(os.devnull, "w") as log:  # the delegate's log, at its level, written nowhere
            asyncio.run(_layer(args.run, args.count, args.url, args.secrets, log))
        return 0
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("bench-instructions needs valgrind (apt-get install valgrind); nothing was measured", file=sys.stderr)
        return 2
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="delegate-instructions-") as tmp:
        secrets = Path(tmp)
        for i, (_, secret) in enumerate(bench_keys(KEYS)):
            (secrets / f"sk{i}").write_text(secret)
        responder = subprocess.Popen([sys.executable, "-m", "bench.canned_aws", str(port)], env=_clean_env(), cwd=ROOT)
        try:
            canned_aws.wait_ready(port)
            url = f"http://127.0.0.1:{port}"
            per = {}
            for layer in LAYERS:
                print(f"- {layer}: {WARM} + {args.count} and {WARM} + {3 * args.count} validations under valgrind")
                low = _count(valgrind, layer, args.count, url, secrets)
                high = _count(valgrind, layer, 3 * args.count, url, secrets)
                per[layer] = (high - low) / (2 * args.count)
        finally:
            responder.terminate()
            responder.wait(timeout=30)
    print(startup.markdown(("layer", "instructions per validation", "adds", "ratio"), rows(per)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
