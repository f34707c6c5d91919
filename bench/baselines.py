"""How a script would validate connectors: boto3 in a thread pool, aiobotocore with clients per connector;
the floor: the two calls alone on one long-lived aiobotocore client pair (no per-connector work);
and below it, the same two calls with no SDK at all (botocore's signer, one aiohttp session, ElementTree).

Each validation is sts:GetCallerIdentity + ec2:DescribeRegions with credentials of its own, as the
delegate does. Run as a subprocess by the benchmark; prints one JSON line with CPU per validation
(this process's CPU after imports and one warm-up) and throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def boto3_pool(endpoint: str, keys: list[tuple[str, str]], threads: int) -> dict[str, float]:
    import boto3  # type: ignore[import-untyped]  # noqa: PLC0415 - only this baseline pays for importing boto3

    session = boto3.session.Session()

    def validate(key: tuple[str, str]) -> None:
        kw = {
            "region_name": "us-east-1",
            "endpoint_url": endpoint,
            "aws_access_key_id": key[0],
            "aws_secret_access_key": key[1],
        }
        session.client("sts", **kw).get_caller_identity()
        session.client("ec2", **kw).describe_regions(RegionNames=["us-east-1"])

    validate(keys[0])  # warm-up: models parsed, as a long-running script would have them
    cpu, wall = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(validate, keys))
    return {
        "cpu_ms": (time.process_time() - cpu) / len(keys) * 1000,
        "per_second": len(keys) / (time.perf_counter() - wall),
    }


def aiobotocore_naive(endpoint: str, keys: list[tuple[str, str]], concurrency: int) -> dict[str, float]:
    from aiobotocore.session import AioSession  # noqa: PLC0415 - likewise

    async def run() -> dict[str, float]:
        session = AioSession()
        gate = asyncio.Semaphore(concurrency)

        async def validate(key: tuple[str, str]) -> None:
            kw = {
                "region_name": "us-east-1",
                "endpoint_url": endpoint,
                "aws_access_key_id": key[0],
                "aws_secret_access_key": key[1],
            }
            async with gate, session.create_client("sts", **kw) as sts, session.create_client("ec2", **kw) as ec2:
                await sts.get_caller_identity()
                await ec2.describe_regions(RegionNames=["us-east-1"])

        await validate(keys[0])
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(validate(k) for k in keys))
        return {
            "cpu_ms": (time.process_time() - cpu) / len(keys) * 1000,
            "per_second": len(keys) / (time.perf_counter() - wall),
        }

    return asyncio.run(run())


def aiobotocore_floor(
    endpoint: str, keys: list[tuple[str, str]], concurrency: int, *, serve: bool = False
) -> dict[str, float]:
    """The least aiobotocore can spend on the two calls: one client pair, made once, one set of keys.

    No credentials per connector, no secret to read, no result to report: what is left is the SDK's
    own cost per call (serialise, sign, send, parse). The delegate's figure minus this one is ours.
    """
    from aiobotocore.config import AioConfig  # noqa: PLC0415 - likewise
    from aiobotocore.session import AioSession  # noqa: PLC0415

    async def run() -> dict[str, float]:
        kw = {
            "region_name": "us-east-1",
            "endpoint_url": endpoint,
            "aws_access_key_id": keys[0][0],
            "aws_secret_access_key": keys[0][1],
            # A fixed User-Agent, as the delegate sets: botocore rebuilds its default one per call.
            "config": AioConfig(user_agent="bench-floor", max_pool_connections=max(32, concurrency)),
        }
        session = AioSession()
        gate = asyncio.Semaphore(concurrency)
        async with session.create_client("sts", **kw) as sts, session.create_client("ec2", **kw) as ec2:
            # The idle baseline: the SDK loaded, the two clients made, nothing sent yet (as the
            # delegate is after its warm-up, before its first task).
            idle = _rss_mib()

            async def validate(_: tuple[str, str]) -> None:
                async with gate:
                    await sts.get_caller_identity()
                    await ec2.describe_regions(RegionNames=["us-east-1"])

            if serve:
                await _serve(validate, keys, idle, warm=max(20, concurrency))
                return {}
            return {**await _measure(validate, keys), "idle_rss_mib": idle}

    return asyncio.run(run())


async def _serve(validate: Callable[[Key], Awaitable[None]], keys: list[Key], idle: float, *, warm: int) -> None:
    """Measure on request, so the bench can interleave this floor with the delegate in small rounds:
    after a warm-up, a line with a number N on stdin runs N validations and prints their JSON line
    (as a one-shot run does); end of input ends it.

    The warm-up runs ``warm`` validations at once, as many as the floor runs at a time, so its
    connection pool is full before the first measurement, as the delegate's is: warmed with 20,
    the floor at 256 opened over 200 connections inside its first measured run over moto, and that
    round's ratio came out 0.1 lower than the others."""
    await asyncio.gather(*(validate(keys[i % len(keys)]) for i in range(warm)))
    print(json.dumps({"ready": True, "idle_rss_mib": idle}), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        batch = [keys[i % len(keys)] for i in range(int(line))]
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(validate(k) for k in batch))
        result = {
            "cpu_ms": (time.process_time() - cpu) / len(batch) * 1000,
            "per_second": len(batch) / (time.perf_counter() - wall),
        }
        print(json.dumps(result), flush=True)


def no_sdk(endpoint: str, keys: list[tuple[str, str]], concurrency: int) -> dict[str, float]:
    """The two calls with no SDK: a hand-built query body, botocore's SigV4 signer, aiohttp, ElementTree.

    Not something the delegate should do (no endpoint rules, retries, error model or credential
    refresh); it answers "what would leaving the SDK buy": the least any Python client on asyncio
    spends on these two requests against this stand-in.
    """
    from xml.etree import ElementTree  # noqa: PLC0415 - likewise

    import aiohttp  # noqa: PLC0415
    from botocore.auth import SigV4Auth  # noqa: PLC0415
    from botocore.awsrequest import AWSRequest  # noqa: PLC0415
    from botocore.credentials import Credentials  # noqa: PLC0415

    credentials = Credentials(keys[0][0], keys[0][1])
    url = endpoint.rstrip("/") + "/"
    form = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}

    async def call(http: aiohttp.ClientSession, service: str, body: bytes) -> None:
        request = AWSRequest(method="POST", url=url, data=body, headers=form)
        SigV4Auth(credentials, service, "us-east-1").add_auth(request)
        async with http.post(url, data=body, headers=dict(request.headers.items())) as response:
            payload = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{service}: HTTP {response.status}")
        ElementTree.fromstring(payload)

    async def run() -> dict[str, float]:
        gate = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as http:

            async def validate(_: tuple[str, str]) -> None:
                async with gate:
                    await call(http, "sts", b"Action=GetCallerIdentity&Version=2011-06-15")
                    await call(http, "ec2", b"Action=DescribeRegions&Version=2016-11-15&RegionName.1=us-east-1")

            return await _measure(validate, keys)

    return asyncio.run(run())


KINDS = {"boto3": boto3_pool, "aiobotocore": aiobotocore_naive, "floor": aiobotocore_floor, "no-sdk": no_sdk}


Key = tuple[str, str]


async def _measure(validate: Callable[[Key], Awaitable[None]], keys: list[Key]) -> dict[str, float]:
    """CPU per validation and throughput of ``keys`` validations at once, after 20 to warm up."""
    await asyncio.gather(*(validate(k) for k in keys[:20]))
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(validate(k) for k in keys))
    return {
        "cpu_ms": (time.process_time() - cpu) / len(keys) * 1000,
        "per_second": len(keys) / (time.perf_counter() - wall),
    }


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("--endpoint", required=True)
    p.add_argument("--keys", required=True, help="JSON file: [[access key, secret key], ...]")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--serve", action="store_true", help="floor only: measure N validations per line of stdin")
    args = p.parse_args()
    keys = [tuple(k) for k in json.load(open(args.keys))]  # noqa: SIM115
    if args.serve:
        if args.kind != "floor":
            p.error("--serve is for the floor")
        aiobotocore_floor(args.endpoint, keys, args.concurrency, serve=True)
        return 0
    out = KINDS[args.kind](args.endpoint, keys, args.concurrency)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
