"""What each entry point imports: the structure behind a fast start, checked without a stopwatch.

Timings are noisy on a shared machine, so the benchmark measures them (``python -m bench --only
startup``); these tests pin the cause instead: which modules a command loads before it answers.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import free_port

#: Modules no start-up path below needs: the daemon, the server stack, the file formats, the loop.
HEAVY = {"aiohttp", "asyncio", "prometheus_client", "structlog", "yaml", "aiobotocore", "botocore", "jwt", "nacl"}

_PROBE = """\
import sys
from agent.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
sys.stderr.write("\\nMODULES " + " ".join(sys.modules))
"""


def _modules(code: str, *argv: str) -> set[str]:
    """The top-level names in ``sys.modules`` after ``code`` ran in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False, timeout=60)
    assert "MODULES " in out.stderr, out.stderr
    return set(out.stderr.rsplit("MODULES ", 1)[1].split())


def _top(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_load_no_command_and_no_heavy_library(flag: str) -> None:
    loaded = _modules(_PROBE, flag)
    assert not _top(loaded) & (HEAVY | {"msgspec"})
    assert {m for m in loaded if m.startswith("agent.")} == {"agent._lazy", "agent._version", "agent.cli"}


@pytest.mark.parametrize("command", [("connector", "list"), ("tasks", "list"), ("connector", "test", "x")])
def test_a_client_command_loads_neither_the_daemon_nor_aiohttp_yaml_or_logging(command: tuple[str, ...]) -> None:
    # Nothing listens on the port: the command fails with exit 3, after importing all it needs.
    loaded = _modules(_PROBE, *command, "--control-plane", f"http://127.0.0.1:{free_port()}", "--api-key", "k")
    assert not _top(loaded) & HEAVY
    assert not {m for m in loaded if m.startswith(("agent.runtime", "agent.controlplane", "agent.aws"))}


def test_importing_the_wire_models_loads_no_other_part_of_the_package() -> None:
    loaded = _modules('import sys, agent.protocol.models; sys.stderr.write("MODULES " + " ".join(sys.modules))')
    ours = {m for m in loaded if m == "agent" or m.startswith("agent.")}
    assert {m for m in ours if not m.startswith("agent.protocol")} <= {"agent", "agent._lazy", "agent._version"}
    assert not _top(loaded) & HEAVY


def test_the_lazy_exports_are_the_same_objects_as_their_modules() -> None:
    import agent
    import agent.controlplane
    import agent.runtime
    from agent.cli import main
    from agent.controlplane.app import ControlPlaneService
    from agent.runtime.agent import Agent
    from agent.runtime.settings import ConfigError

    assert (agent.Agent, agent.main, agent.runtime.ConfigError) == (Agent, main, ConfigError)
    assert agent.controlplane.ControlPlaneService is ControlPlaneService
    assert set(agent.__all__) <= set(dir(agent))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = agent.nothing  # type: ignore[attr-defined]


def test_the_delegate_daemon_loads_neither_pyjwt_nor_cryptography() -> None:
    """The delegate only mints its own HS256 tokens: PyJWT (and the OpenSSL bindings of
    ``cryptography`` it pulls in) cost 9 MiB of idle memory for one HMAC. Only the control plane,
    which verifies tokens from the network, loads them."""
    loaded = _modules(
        "import sys, agent.runtime.agent, agent.aws.handler, agent.runtime.signing\n"
        "from agent.protocol.auth import RequestSigner, TokenSource\n"
        "RequestSigner(TokenSource(value='t' * 32), issuer='d').header()\n"
        'sys.stderr.write("MODULES " + " ".join(sys.modules))'
    )
    assert not _top(loaded) & {"jwt", "cryptography", "joserfc", "jinja2", "yaml"}
    # PyNaCl only once a task key is pinned (then it checks every task's signature).
    assert "nacl" not in _top(loaded)
    pinned = _modules(
        "import sys, base64\n"
        "from agent.runtime.signing import task_check_from_key\n"
        "assert task_check_from_key(base64.b64encode(bytes(32)).decode()) is not None\n"
        'sys.stderr.write("MODULES " + " ".join(sys.modules))'
    )
    assert "nacl" in _top(pinned)


def test_a_token_the_delegate_mints_is_one_the_control_plane_accepts() -> None:
    from agent.protocol.auth import RequestSigner, TokenKey, TokenSource, TokenVerifier

    signer = RequestSigner(TokenSource(value="s" * 40), issuer="delegate-1", clock=lambda: 1_000_000.0)
    verifier = TokenVerifier([TokenKey("main", "s" * 40)], clock=lambda: 1_000_010.0)
    claims = verifier.verify(signer.header())
    assert (claims.token_name, claims.issuer, claims.expires_at) == ("main", "delegate-1", 1_000_300.0)
    forged = RequestSigner(TokenSource(value="x" * 40), issuer="delegate-1", clock=lambda: 1_000_000.0)
    with pytest.raises(Exception, match="unknown delegate token"):
        verifier.verify(forged.header())
