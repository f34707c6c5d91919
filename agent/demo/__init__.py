"""``delegate-agent demo``: the whole story on one machine.

It starts, on 127.0.0.1 with free ports and a temporary directory: an AWS stand-in (moto, seeded,
IAM enforced), the reference control plane, and two delegates as separate processes with their own
environments (``eks-prod-0`` with IRSA, ``ec2-gov-0`` with an instance role and a GovCloud secret),
as pods would have. It applies nine Harness connectors, tests each through the control plane,
and prints who ran it, who the credentials are, and why it failed where it must fail.

Stopping: the first Ctrl-C (or SIGTERM) at any moment stops everything the demo started and exits
0; a second one kills the delegates without waiting for them to drain. The delegates die with the
demo even when it is killed outright (``PR_SET_PDEATHSIG`` on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from agent.controlplane.app import ControlPlaneConfig, ControlPlaneService
from agent.controlplane.core import ControlPlaneSettings
from agent.controlplane.platform import platform_validator_from_env
from agent.demo.oidc_sts import OidcSts
from agent.demo.scenario import Case, cases
from agent.demo.standin import (
    IRSA_ISSUER,
    AwsStandIn,
    DemoExtraMissing,
    InstanceMetadata,
    Seeded,
    write_irsa_token,
)
from agent.observability.logging import Redactor, configure_logging
from agent.protocol.api_client import ApiClient
from agent.protocol.auth import generate_token
from agent.protocol.models import TaskView, TestRequest

__all__ = ["run_demo"]

T = TypeVar("T")

#: linux/prctl.h: deliver a signal to this process when the thread that forked it ends.
_PR_SET_PDEATHSIG = 1
#: How long a delegate may take to drain and deregister before it is killed (its own watchdog
#: ends a stuck shutdown after AGENT_DRAIN_TIMEOUT_SECONDS + the default 8 s grace, 13 s here).
_DELEGATE_STOP_SECONDS = 20.0


@dataclass
class Delegate:
    name: str
    tags: str
    process: subprocess.Popen[bytes]
    http: str
    log: Path


class Demo:
    def __init__(self, out: TextIO, *, keep_running: bool, workdir: Path) -> None:
        self.out = out
        self.keep_running = keep_running
        self.dir = workdir
        self.started = time.monotonic()
        self.delegates: list[Delegate] = []
        # Set by the first Ctrl-C/SIGTERM. While ``_interruptible``, it cancels the start-up (every
        # ``finally`` then stops what was started); afterwards the run ends by itself, cleanly.
        self._stop = asyncio.Event()
        self._interruptible = True
        # The blocking API calls get their own threads, so a Ctrl-C while eight tests are waiting
        # never queues the delegates' shutdown behind them in the default executor.
        self._api_threads = ThreadPoolExecutor(max_workers=10, thread_name_prefix="demo-api")

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def step(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.started:5.1f}s] {text}")

    async def run(self) -> int:
        """The demo's exit code: 0 when every outcome is the expected one, or when Ctrl-C stopped it."""
        loop = asyncio.get_running_loop()
        # First thing, before anything is started: a signal at any later moment finds our handler.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        work = asyncio.create_task(self._run_stack(), name="demo")
        stopper = asyncio.create_task(self._stop.wait(), name="demo-stop")
        try:
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if self._stop.is_set() and self._interruptible:
                work.cancel()
            try:
                return await work
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not work.cancelled() or (task is not None and task.cancelling()):
                    raise
                self.step("stopped by request; everything the demo started is stopped")
                return 0
        finally:
            stopper.cancel()
            if not work.done():  # we were cancelled ourselves: still stop what was started
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            self._api_threads.shutdown(wait=False, cancel_futures=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            return
        # A second Ctrl-C: do not wait for the delegates to drain.
        for d in self.delegates:
            if d.process.poll() is None:
                d.process.kill()

    async def _api(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._api_threads, call, *args)

    async def _run_stack(self) -> int:
        aws = AwsStandIn()
        self.step("starting the AWS stand-in (moto on 127.0.0.1, IAM enforced)")
        aws.start()
        try:
            seeded = await aws.seed()
            self._seeded = seeded
            imds = InstanceMetadata("ec2-node-role", seeded.node_credentials)
            # STS that checks web identity tokens as AWS does; the fake IRSA token's issuer, by name only, is not.
            sts = OidcSts(aws.url, seeded.broker_key, seeded.broker_secret, unverified_issuers=[IRSA_ISSUER])
            async with imds.running() as imds_url, sts.running() as sts_url:
                return await self._with_aws(aws, imds_url, sts_url, seeded)
        finally:
            aws.stop()

    async def _with_aws(self, aws: AwsStandIn, imds_url: str, sts_url: str, seeded: Seeded) -> int:
        aws_url = aws.url
        self.step("starting the reference control plane (also the OIDC issuer of OidcAuthentication connectors)")
        cp_dir = self.dir / "control-plane"
        cp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # its own, as the control plane wants it
        token_file, key_file = cp_dir / "delegate-token", cp_dir / "api-key"
        for path in (token_file, key_file):
            path.write_text(generate_token() + "\n")
            path.chmod(0o600)
        # The issuer URL is the control plane's own, so its port is chosen first (AWS would want https on 443).
        port = _free_port()
        issuer = f"http://127.0.0.1:{port}/oidc"
        # "Connect through the platform" (the wizard's first choice) works here too: the control
        # plane validates against the stand-ins, with the deployer's secret key in its own secrets.
        platform = platform_validator_from_env(
            {"AWS_ENDPOINT_URL": aws_url, "AWS_ENDPOINT_URL_STS": sts_url, "AWS_EC2_METADATA_DISABLED": "true"},
            secrets_dir=self._secrets("control-plane", {"deployer_secret_key": seeded.deployer_secret}),
            redactor=Redactor(),
        )
        cp = ControlPlaneService(
            ControlPlaneConfig(
                host="127.0.0.1",
                port=port,
                data_dir=cp_dir,
                oidc_issuer=issuer,
                delegate_token_file=token_file,
                api_key_file=key_file,
                settings=ControlPlaneSettings(
                    heartbeat_seconds=2,
                    poll_wait_seconds=10,
                    lease_seconds=15,
                    pickup_timeout_seconds=20,
                    # With --keep-running, a credential broken in the AWS stand-in shows within minutes.
                    connector_test_interval_seconds=120,
                ),
            ),
            platform_validator=platform,
        )
        await cp.start()
        try:
            # As a user would in their account: an IAM identity provider for the issuer, and a role its
            # tokens may assume when their sub names an account-level connector.
            seeded.oidc_role = await aws.trust_oidc_issuer(issuer, "oidc-connectors", "connector:-/-/*")
            self._start_delegates(cp, aws_url, imds_url, sts_url, seeded)
            await self._wait_registered(cp)
            client = ApiClient(cp.url, cp.api_key, timeout=60)
            scenario = cases(seeded)
            self.step(f"applying {len(scenario)} connectors (Harness YAML) through the API")
            for case in scenario:
                result = await self._api(client.apply_connector, case.document)
                self.say(f"         connector/{result.identifier} {result.outcome}")
            self.step("testing every connector through the control plane (in parallel)")
            views = await asyncio.gather(*(self._test(client, c) for c in scenario))
            self._interruptible = False  # from here on the run ends by itself; a signal only shortens it
            code = self._report(scenario, views)
            if self.keep_running:
                await self._keep_running(cp, aws_url)
            return code
        finally:
            self._interruptible = False
            await self._stop_delegates()
            await cp.stop()

    # --- delegates ---------------------------------------------------------------------------

    def _start_delegates(self, cp: ControlPlaneService, aws_url: str, imds_url: str, sts_url: str, s: Seeded) -> None:
        token_file = self.dir / "control-plane" / "delegate-token"
        irsa_token = write_irsa_token(self.dir / "eks-prod-0")
        eks_secrets = self._secrets(
            "eks-prod-0", {"deployer_secret_key": s.deployer_secret, "auditor_secret_key": s.auditor_secret}
        )
        gov_secrets = self._secrets("ec2-gov-0", {"gov_secret_key": s.gov_secret})
        common = {
            "MANAGER_HOST_AND_PORT": cp.url,
            "DELEGATE_TOKEN_FILE": str(token_file),
            "AWS_ENDPOINT_URL": aws_url,
            "AGENT_LOG_FORMAT": "json",
            "AGENT_DRAIN_TIMEOUT_SECONDS": "5",
        }
        self._spawn(
            "eks-prod-0",
            "eks,prod",
            {
                **common,
                "AGENT_SECRETS_DIR": str(eks_secrets),
                "AWS_ROLE_ARN": s.irsa_role,
                "AWS_WEB_IDENTITY_TOKEN_FILE": str(irsa_token),
                # STS for this pod: accepts AssumeRoleWithWebIdentity unsigned (see OidcSts).
                "AWS_ENDPOINT_URL_STS": sts_url,
                "AWS_EC2_METADATA_DISABLED": "true",
            },
        )
        self._spawn(
            "ec2-gov-0",
            "ec2,gov",
            {
                **common,
                "AGENT_SECRETS_DIR": str(gov_secrets),
                # The checking STS for OIDC connectors, whichever delegate takes them ("any delegate").
                "AWS_ENDPOINT_URL_STS": sts_url,
                "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds_url,
                "AWS_EC2_METADATA_DISABLED": "false",
            },
        )

    def _secrets(self, name: str, values: dict[str, str]) -> Path:
        d = self.dir / name / "secrets"
        d.mkdir(parents=True, exist_ok=True)
        for key, value in values.items():
            (d / key).write_text(value)
            (d / key).chmod(0o600)
        return d

    def _spawn(self, name: str, tags: str, extra: dict[str, str]) -> None:
        port = _free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "AGENT_", "DELEGATE_", "MANAGER_", "CONTROL_PLANE_"))
        }
        env.update(
            {
                "DELEGATE_NAME": name,
                "DELEGATE_TAGS": tags,
                "AGENT_HTTP_LISTEN": f"127.0.0.1:{port}",
                "AGENT_DATA_DIR": str(self.dir / name / "data"),
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "NO_PROXY": "127.0.0.1,localhost",
                **extra,
            }
        )
        log = self.dir / name / "delegate.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as f:
            # Called on the loop's (main) thread, which lives as long as the demo: the parent-death
            # signal fires when the thread that forked the child ends, not only the process.
            process = subprocess.Popen(
                [sys.executable, "-m", "agent", "run"],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                **_tied_to_this_process(),
            )
        self.delegates.append(Delegate(name, tags, process, f"http://127.0.0.1:{port}", log))
        self.step(f"started delegate {name} (tags {tags}) as process {process.pid}")

    async def _wait_registered(self, cp: ControlPlaneService, timeout: float = 45) -> None:
        deadline = time.monotonic() + timeout
        names = {d.name for d in self.delegates}
        while True:
            for d in self.delegates:
                if d.process.poll() is not None:
                    raise DemoFailed(f"delegate {d.name} exited with {d.process.returncode}:\n{_tail(d.log)}")
            registered = {v.name for v in await cp.core.delegate_views() if v.state == "running"}
            if names <= registered:
                self.step(f"both delegates registered: {', '.join(sorted(names))}")
                return
            if time.monotonic() > deadline:
                raise DemoFailed(f"delegates did not register within {timeout:.0f}s (registered: {sorted(registered)})")
            await asyncio.sleep(0.1)

    async def _stop_delegates(self) -> None:
        """SIGTERM every delegate, then wait for all at once (bounded), without blocking the loop."""
        for d in self.delegates:
            if d.process.poll() is None:
                d.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(self._reap(d) for d in self.delegates))

    async def _reap(self, d: Delegate) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(d.process.wait, _DELEGATE_STOP_SECONDS)
        if d.process.poll() is None:
            self.step(f"delegate {d.name} did not stop within {_DELEGATE_STOP_SECONDS:.0f}s; killing it")
            d.process.kill()
            await asyncio.to_thread(d.process.wait)
        elif d.process.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            self.step(f"delegate {d.name} exited with {d.process.returncode} (log: {d.log})")

    # --- tests and the report ----------------------------------------------------------------

    async def _test(self, client: ApiClient, case: Case) -> TaskView:
        request = TestRequest(wait_seconds=60, pickup_timeout_seconds=case.pickup_timeout)
        _, view = await self._api(client.test_connector, case.identifier, request)
        ok = _outcome(view) == case.expect
        self.step(
            f"  {'ok  ' if ok else 'FAIL'} {case.identifier}: {_outcome(view)} "
            f"(on {view.delegate_name or 'no delegate'})"
        )
        return view

    def _report(self, scenario: list[Case], views: list[TaskView]) -> int:
        rows, notes, wrong = [], [], []
        for case, view in zip(scenario, views, strict=True):
            r, failure = view.result, view.result.failure if view.result else None
            outcome = _outcome(view)
            matched = outcome == case.expect and (
                case.expect_step is None or (failure is not None and failure.step == case.expect_step)
            )
            if not matched:
                wrong.append(f"{case.identifier}: expected {case.expect}, got {outcome}")
            rows.append(
                [
                    case.identifier,
                    (r.credential_type if r else None) or _credential_type(case),
                    view.delegate_name or "-",
                    (r.identity.arn if r and r.identity else None) or "-",
                    ("as expected: " if matched else "UNEXPECTED: ") + (view.status or "?"),
                ]
            )
            if view.status != "SUCCESS":
                code = f", AWS {failure.aws_error_code}" if failure and failure.aws_error_code else ""
                step, category = (failure.step, failure.category) if failure else ("-", "-")
                notes.append(f"  {case.identifier}: failed at {step} ({category}{code})")
                notes.append(f"      {(r.error_summary if r else None) or view.failure_reason}")
                if failure and failure.hint:
                    notes.append(f"      hint: {failure.hint}")
        self.say("")
        _table(self.out, rows, ["connector", "credentials", "delegate", "identity", "outcome"])
        self.say("")
        self.say("Failures (each one expected), with the step, the AWS error code and the hint:")
        for line in notes:
            self.say(line)
        self.say("")
        if wrong:
            self.say("The demo did NOT go as expected:")
            for w in wrong:
                self.say(f"  {w}")
            self.say(f"Delegate logs: {', '.join(str(d.log) for d in self.delegates)}")
            return 1
        self.step(f"all {len(scenario)} outcomes as expected")
        return 0

    async def _keep_running(self, cp: ControlPlaneService, aws_url: str) -> None:
        key_file = self.dir / "control-plane" / "api-key"
        connectors = self.dir / "connectors"
        connectors.mkdir(exist_ok=True)
        for case in cases(self._seeded):
            (connectors / f"{case.identifier}.yaml").write_text(case.yaml)
        me = "delegate-agent"
        self.say("")
        self.say("The stack keeps running. Try it by hand (Ctrl-C stops everything):")
        self.say(f"  web console     {cp.url}/console/   (log in with the API key: cat {key_file})")
        self.say(f"  control plane   {cp.url}   (OpenAPI: {cp.url}/openapi.json)")
        for d in self.delegates:
            self.say(f"  {d.name:<15} {d.http}/status   {d.http}/metrics   log: {d.log}")
        self.say(f"  AWS stand-in    {aws_url}")
        self.say("")
        scripts = Path(sys.executable).parent
        if shutil.which(me) is None and (scripts / me).exists():
            self.say(f"  export PATH={scripts}:$PATH   # where {me} is installed (the demo's own Python)")
        self.say(f"  export CONTROL_PLANE_URL={cp.url} CONTROL_PLANE_API_KEY=$(cat {key_file})")
        self.say(f"  {me} delegates list")
        self.say(f"  {me} connector list")
        self.say(f"  {me} connector test aws_irsa")
        self.say(f"  {me} connector apply -f {connectors / 'aws_access_key.yaml'}")
        self.say(
            f"  AWS_ENDPOINT_URL={aws_url} {me} validate -f {connectors / 'aws_access_key.yaml'} "
            f"--secrets-dir {self.dir / 'eks-prod-0' / 'secrets'}"
        )
        self.say("")
        self.say("In the web console, New connector walks Harness's wizard; Save and Continue runs the test.")
        self.say("Credentials and connectivity that work here:")
        self.say(
            f"  AWS Access Key      access key {self._seeded.deployer_key}, secret key reference "
            "account.deployer_secret_key; delegates with the tag eks, or through the platform"
        )
        self.say("  Use IRSA            delegates with the tag eks (eks-prod-0 has the IRSA role)")
        self.say("  Assume IAM Role     delegates with the tag ec2 (ec2-gov-0 has the instance role)")
        self.say(
            f"  Use OIDC            IAM role ARN {self._seeded.oidc_role} (it trusts every connector of "
            "the account: sub connector:-/-/*), any connectivity mode"
        )
        secret = self.dir / "eks-prod-0" / "secrets" / "deployer_secret_key"
        self.say("")
        self.say("Connector health: every connector is re-tested every 2 minutes. Break a secret, watch, restore:")
        self.say(f"  cp {secret} {secret}.bak && echo wrong-secret > {secret}")
        self.say(f"  {me} connector history aws_access_key   # FAILURE at its next test (a scheduled one)")
        self.say(f"  mv {secret}.bak {secret}   # and back to SUCCESS at the test after")
        self.say("")
        self.say("Ctrl-C stops everything cleanly.")
        await self._stop.wait()  # the handler has been in place since the demo started
        self.step("stopping: delegates drain and deregister, then the control plane and AWS stop")


class DemoFailed(Exception):
    pass


def _outcome(view: TaskView) -> str:
    if view.status == "SUCCESS":
        return "SUCCESS"
    if view.failure_reason:
        return view.failure_reason
    failure = view.result.failure if view.result else None
    return failure.category if failure else view.state


def _credential_type(case: Case) -> str:
    return str(case.document["connector"]["spec"]["credential"]["type"])


def _table(out: TextIO, rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _tied_to_this_process() -> dict[str, Any]:
    """Popen arguments that end a delegate when the demo ends, even when the demo is SIGKILLed.

    On Linux the child asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``;
    the delegate then drains as on any SIGTERM, bounded by its watchdog) and gets its own process
    group, so a terminal's Ctrl-C reaches only the demo, which then stops each delegate once.
    Elsewhere the delegates stay in the demo's process group, where the terminal's signals reach
    them too.
    """
    if not sys.platform.startswith("linux"):
        return {}
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent, sigterm = os.getpid(), int(signal.SIGTERM)

    def tie() -> None:
        # Between fork and exec: only the call resolved above. If the demo died before the call,
        # no signal would ever come, so the delegate must not start at all.
        if prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(70)

    return {"preexec_fn": tie, "process_group": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(*, keep_running: bool = False, workdir: Path | None = None, out: TextIO | None = None) -> int:
    """Run the demo; returns the exit code (0 when every outcome is the expected one)."""
    out = out or sys.stdout
    configure_logging(fmt="console", level="warning")
    temporary = workdir is None
    directory = workdir or Path(tempfile.mkdtemp(prefix="delegate-agent-demo-"))
    demo = Demo(out, keep_running=keep_running, workdir=directory)
    try:
        return asyncio.run(demo.run())
    except KeyboardInterrupt:
        # Ctrl-C before the demo's own handler was in place: nothing had started yet.
        return 0
    except DemoExtraMissing as exc:
        print(f"delegate-agent demo: {exc}", file=sys.stderr)
        return 2
    except DemoFailed as exc:
        print(f"delegate-agent demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)
