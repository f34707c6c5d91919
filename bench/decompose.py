"""``make bench-decompose``: the delegate's CPU per validation taken apart, in one process.

The canned rows of ``make bench`` give one figure for the whole delegate against the SDK's floor.
This splits the handler's part of it into layers, each measured against the canned AWS in the
same process, interleaved in small chunks (200 validations each, 30 rounds, order alternating) so
the machine's drift falls on every layer alike. The layers, each including the one above:

- ``floor``: the two calls on one client pair with static keys (bench/baselines.py's floor);
- ``sdk``: the same two calls as the validator makes them: the delegate's shared clients, with the
  task's credentials bound per call, and ``AllRegions=True``;
- ``handler``: the whole AWS handler: the connector parsed, its secret read, credentials built,
  each step timed and counted, the result document built and redacted;
- ``boundary``: plus the executor's redaction of the result (its guarantee for every handler).

What the delegate spends beyond ``boundary`` is the runtime (leases, outbox, reporting, polling,
the event loop's work for them): the canned rows of ``make bench`` minus ``boundary``.
Run with the canned AWS on one core and this process on the other (bench/cores.py), with the
delegate's garbage-collection settings once warm (frozen heap, young collections every 10,000).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import canned_aws, cores, startup
from bench.load import ROOT, _clean_env, free_port

if TYPE_CHECKING:
    from agent.taskapi import TaskContext

Validate = Callable[[int], Awaitable[None]]
LAYERS = ("floor", "sdk", "handler", "boundary")


def bench_keys(n: int = 300) -> list[tuple[str, str]]:
    """The connectors' keys, as make bench makes them: an access key each and its secret."""
    rand = random.Random(1)
    return [(f"AKIABENCH{i:011d}", f"secret-{rand.getrandbits(64):016x}") for i in range(n)]


def connector(i: int, keys: list[tuple[str, str]]) -> dict[str, Any]:
    """Connector ``i``: its own name, the ``i``-th key (cycled), the secret key from file ``sk<i>``."""
    spec = {"accessKey": keys[i % len(keys)][0], "secretKeyRef": f"sk{i % len(keys)}"}
    return {
        "connector": {
            "name": f"c{i}",
            "identifier": f"c{i}",
            "type": "Aws",
            "spec": {"credential": {"type": "ManualConfig", "spec": spec}, "delegateSelectors": ["bench"]},
        }
    }


def task_context(i: int, keys: list[tuple[str, str]]) -> TaskContext:
    """The context the executor hands the AWS handler for a validation of connector ``i``."""
    from agent.protocol.models import TASK_TYPE_AWS_VALIDATE  # noqa: PLC0415 - loaded where measured
    from agent.taskapi import TaskContext  # noqa: PLC0415

    return TaskContext(
        task_id=f"tsk_{i}",
        type=TASK_TYPE_AWS_VALIDATE,
        payload={"connector": connector(i, keys)},
        delegate_id="dlg_bench",
        delegate_name="bench",
        timeout=30,
        attempt=1,
        oidc_token=None,
    )


async def _measure(url: str, secrets: Path, keys: list[tuple[str, str]], rounds: int, chunk: int) -> dict[str, float]:
    from aiobotocore.config import AioConfig  # noqa: PLC0415 - the SDK loads only for this command
    from aiobotocore.credentials import AioCredentials  # noqa: PLC0415
    from aiobotocore.session import AioSession  # noqa: PLC0415

    from agent.aws.environment import AwsEnvironment  # noqa: PLC0415
    from agent.cli import build_handlers  # noqa: PLC0415
    from agent.observability.logging import Redactor  # noqa: PLC0415
    from agent.observability.metrics import AgentMetrics  # noqa: PLC0415
    from agent.runtime.agent import GC_YOUNG_OBJECTS  # noqa: PLC0415

    env, problems = AwsEnvironment.from_environ({"AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"})
    if problems:
        raise RuntimeError(problems)
    redactor = Redactor()
    [handler] = build_handlers(env, redactor, AgentMetrics(name="decompose"), secrets_dir=secrets, capacity=256)
    await handler.warm()  # type: ignore[attr-defined]
    clients = handler.validator.clients  # type: ignore[attr-defined]
    gate = asyncio.Semaphore(256)
    kw: dict[str, Any] = {
        "region_name": "us-east-1",
        "endpoint_url": url,
        "aws_access_key_id": keys[0][0],
        "aws_secret_access_key": keys[0][1],
        "config": AioConfig(user_agent="bench-floor", max_pool_connections=32),
    }
    creds = AioCredentials(keys[0][0], keys[0][1])

    session = AioSession()
    async with session.create_client("sts", **kw) as sts, session.create_client("ec2", **kw) as ec2:

        async def floor(_: int) -> None:
            async with gate:
                await sts.get_caller_identity()
                await ec2.describe_regions(RegionNames=["us-east-1"])

        async def sdk(_: int) -> None:
            async with gate:
                with clients.bound(creds):
                    async with clients.client("sts", "us-east-1") as c:
                        await c.get_caller_identity()
                    async with clients.client("ec2", "us-east-1") as c:
                        await c.describe_regions(RegionNames=["us-east-1"], AllRegions=True)

        async def run_handler(i: int, *, boundary: bool) -> None:
            async with gate:
                result = await handler(task_context(i, keys))
                if result.status != "SUCCESS":
                    raise RuntimeError(f"a validation against the canned AWS failed: {result}")
                if boundary:
                    redactor.value(result)

        async def handler_only(i: int) -> None:
            await run_handler(i, boundary=False)

        async def with_boundary(i: int) -> None:
            await run_handler(i, boundary=True)

        layers: list[tuple[str, Validate]] = [
            ("floor", floor),
            ("sdk", sdk),
            ("handler", handler_only),
            ("boundary", with_boundary),
        ]
        for _, validate in layers:  # warm: models, endpoints, pools, caches
            await asyncio.gather(*(validate(i) for i in range(100)))
        # The delegate's garbage collection once it is warm (agent/runtime/agent.py), for every layer:
        # with CPython's defaults, a layer that allocates more also pays for more walks of the heap.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])
        spent = dict.fromkeys(LAYERS, 0.0)
        for r in range(rounds):
            for name, validate in layers if r % 2 == 0 else layers[::-1]:
                started = time.process_time()
                await asyncio.gather(*(validate(i) for i in range(chunk)))
                spent[name] += time.process_time() - started
    await handler.aclose()  # type: ignore[attr-defined]
    return {name: spent[name] / (rounds * chunk) * 1000 for name in LAYERS}


def rows(ms: dict[str, float]) -> list[tuple[str, ...]]:
    """One row per layer: its CPU per validation, what it adds over the layer above, its ratio to the floor."""
    what = {
        "floor": "the SDK's floor: two calls, one client pair, static keys",
        "sdk": "the same calls as the validator makes them (shared clients, the task's credentials)",
        "handler": "the AWS handler: connector, secret, credentials, steps, result, redaction",
        "boundary": "plus the executor's redaction of the result",
    }
    return layer_rows(ms, what, unit="ms", base="floor")


def layer_rows(
    values: Mapping[str, float], what: Mapping[str, str], *, unit: str, base: str, scale: float = 1.0, digits: int = 2
) -> list[tuple[str, ...]]:
    """One row per layer, in ``what``'s order: its value (times ``scale``, in ``unit``), what it adds
    over the layer above, and its ratio to the ``base`` layer (with ``digits`` decimals)."""
    out: list[tuple[str, ...]] = []
    above: str | None = None
    for name, text in what.items():
        added = "" if above is None else f"{(values[name] - values[above]) * scale:+.3f} {unit}"
        ratio = f"{values[name] / values[base]:.{digits}f}x {base}"
        out.append((text, f"{values[name] * scale:.3f} {unit}", added, ratio))
        above = name
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--chunk", type=int, default=200, help="validations per layer per round")
    args = parser.parse_args()
    keys = bench_keys()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="delegate-decompose-") as tmp:
        secrets = Path(tmp)
        for i, (_, secret) in enumerate(keys):
            (secrets / f"sk{i}").write_text(secret)
        responder = subprocess.Popen([sys.executable, "-m", "bench.canned_aws", str(port)], env=_clean_env(), cwd=ROOT)
        try:
            canned_aws.wait_ready(port)
            with cores.split(aside=[responder.pid]) as pins:
                # This process measures; it takes the measured core, the stand-in keeps the other.
                pins.measure(os.getpid())
                ms = asyncio.run(_measure(f"http://127.0.0.1:{port}", secrets, keys, args.rounds, args.chunk))
        finally:
            responder.terminate()
            responder.wait(timeout=30)
    header = ("layer", "CPU per validation", "adds", "ratio")
    print(startup.markdown(header, rows(ms)))
    print(
        f"({args.rounds} rounds of {args.chunk} validations per layer, 256 at a time, interleaved; "
        f"{'this process on a core of its own' if pins.active else 'not pinned (fewer than two cores)'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
