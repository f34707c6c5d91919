"""How a script would validate connectors: boto3 in a thread pool, aiobotocore with clients per connector;
and the floor: the two calls alone on one long-lived aiobotocore client pair (no per-connector work).

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
from concurrent.futures import ThreadPoolExecutor


def boto3_pool(endpoint: str, keys: list[tuple[str, str]], threads: int) -> dict[str, float]:
    import boto3  # noqa: PLC0415 - only this baseline pays for importing boto3

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


def aiobotocore_floor(endpoint: str, keys: list[tuple[str, str]], concurrency: int) -> dict[str, float]:
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
            "config": AioConfig(user_agent="bench-floor", max_pool_connections=32),
        }
        session = AioSession()
        gate = asyncio.Semaphore(concurrency)
        async with session.create_client("sts", **kw) as sts, session.create_client("ec2", **kw) as ec2:

            async def validate(_: tuple[str, str]) -> None:
                async with gate:
                    await sts.get_caller_identity()
                    await ec2.describe_regions(RegionNames=["us-east-1"])

            await asyncio.gather(*(validate(k) for k in keys[:20]))
            cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(*(validate(k) for k in keys))
            return {
                "cpu_ms": (time.process_time() - cpu) / len(keys) * 1000,
                "per_second": len(keys) / (time.perf_counter() - wall),
            }

    return asyncio.run(run())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["boto3", "aiobotocore", "floor"])
    p.add_argument("--endpoint", required=True)
    p.add_argument("--keys", required=True, help="JSON file: [[access key, secret key], ...]")
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    keys = [tuple(k) for k in json.load(open(args.keys))]  # noqa: SIM115
    if args.kind == "boto3":
        out = boto3_pool(args.endpoint, keys, args.concurrency)  # type: ignore[arg-type]
    elif args.kind == "aiobotocore":
        out = aiobotocore_naive(args.endpoint, keys, args.concurrency)  # type: ignore[arg-type]
    else:
        out = aiobotocore_floor(args.endpoint, keys, args.concurrency)  # type: ignore[arg-type]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
