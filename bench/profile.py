"""``make profile``: where the delegate's CPU goes during validations, sampled by py-spy.

The same stack as ``make bench`` (moto kept alive, the control plane, one delegate from the
runtime-only venv). py-spy samples the delegate while it runs a batch of validations; each sample
is put in one bucket by what its stack is doing, and the buckets are printed as shares of the
delegate's CPU and as milliseconds per validation.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import canned_aws
from bench.__main__ import ROOT, Bench, _create_many
from bench.load import Stack, free_port

PY_SPY = ROOT / ".tools" / "bench" / "py-spy" / "bin" / "py-spy"

#: (bucket, a frame the stack must contain, and optionally a frame it must also contain), first match wins.
BUCKETS: list[tuple[str, str, str | None]] = [
    ("HTTP: opening connections (pools grow with the burst)", "sock_connect", None),
    ("AWS: reading the secret, building credentials", "AwsValidationHandler.__call__", "CredentialResolver"),
    ("AWS: the two SDK calls (serialise, sign, send, parse)", "AwsValidationHandler.__call__", "botocore/"),
    ("AWS: our validation logic and result document", "AwsValidationHandler.__call__", None),
    ("HTTP: writing request bodies (AWS and control plane)", "ClientRequest.write_bytes", None),
    ("HTTP: reading responses", "_read_ready", None),
    ("task: executor bookkeeping, redaction, outbox, metrics, log line", "Executor._run", None),
    ("results: batches of up to 64 per request, outbox delete", "Reporter._send_all", None),
    ("results: reporter loop, outbox reads", "Reporter.run", None),
    ("polling for tasks", "Poller.run", None),
    ("heartbeats", "Connection.run", None),
    ("task: lease renewals (one keeper for all running tasks)", "Executor._renew", None),
    ("task: lease renewals (one keeper for all running tasks)", "Executor._keep_leases", None),
]


def bucket_of(stack: str) -> str:
    for name, frame, also in BUCKETS:
        if frame in stack and (also is None or also in stack):
            return name
    return "event loop and the rest"


def aggregate(raw: str) -> Counter[str]:
    """py-spy raw output (``frame;frame;... count``) into buckets; idle samples (epoll) are left out."""
    out: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        if re.search(r"\bselect \(selectors\.py|poll \(selectors\.py", leaf):
            continue
        out[bucket_of(stack)] += int(count)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validations", type=int, default=600)
    parser.add_argument("--raw", metavar="FILE", help="also keep py-spy's raw samples (for flamegraph tools)")
    parser.add_argument(
        "--canned", action="store_true", help="against the canned AWS (bench/canned_aws.py) instead of moto"
    )
    args = parser.parse_args()
    subprocess.run(["bash", str(ROOT / "bench" / "setup.sh")], check=True)
    with tempfile.TemporaryDirectory(prefix="delegate-profile-") as tmp:
        workdir = Path(tmp)
        bench = Bench(workdir, quick=True, log=lambda m: print(f"- {m}", file=sys.stderr, flush=True))
        stack = Stack(workdir, capacity=256, lease_seconds=30)
        try:
            stack.start_moto(keepalive=True)
            bench._seed(stack.moto_url)
            stack.start_control_plane()
            api = stack.api
            aws = None
            if args.canned:
                port = free_port()
                stack.processes["canned-aws"] = subprocess.Popen(
                    [sys.executable, "-m", "bench.canned_aws", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL
                )
                canned_aws.wait_ready(port)
                aws = f"http://127.0.0.1:{port}"
            agent = bench._agent(stack, "bench", capacity=256, aws=aws)
            bench._wait_registered(api, "bench")
            bench._validate_many(api, agent, 50)  # warm
            out = workdir / "samples.txt"
            pid = str(agent.process.pid)
            spy = subprocess.Popen(
                [str(PY_SPY), "record", "-p", pid, "-o", str(out), "-f", "raw", "-r", "250", "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # py-spy attaches
            bench.log(f"sampling the delegate over {args.validations} validations")
            cpu = agent.cpu()
            ids = _create_many(api, [bench._connector(i) for i in range(args.validations)])
            for task_id in ids:
                api.get_task(task_id, wait=120)
            per_validation = (agent.cpu() - cpu) / args.validations * 1000
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
            raw = out.read_text()
            buckets = aggregate(raw)
            if args.raw:
                Path(args.raw).write_text(raw)
        finally:
            stack.stop()
    total = sum(buckets.values()) or 1
    print(f"delegate CPU per validation: {per_validation:.1f} ms ({total} busy samples)\n")
    print("| where | share | ms per validation |")
    print("|---|---|---|")
    for name, count in buckets.most_common():
        print(f"| {name} | {count / total * 100:.0f}% | {count / total * per_validation:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
