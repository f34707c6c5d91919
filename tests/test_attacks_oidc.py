"""Issue 18 attacked: the control plane as an OIDC issuer, tried for leaks, forged or misrouted tokens,
abused issuer routes and operator mistakes, against a real control plane, real delegates and the STS
stand-in (agent/demo/oidc_sts.py), which verifies the token as AWS does.

Each test is one attack; the ones named for a defect failed before the fix that came with them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.controlplane.app import ControlPlaneConfig, ControlPlaneService, CredentialsError
from tests.test_oidc_e2e import World, connector, sts_clock, world  # noqa: F401 - fixtures

pytestmark = pytest.mark.attacks


# --- operator mistakes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("issuer", "words"),
    [
        ("https://cp.example.com/oidc{x", "path"),  # was a ValueError traceback from aiohttp's router
        ("https://cp.example.com/{tenant}", "path"),  # was a route pattern matching any first segment
        ("https://cp.example.com/a/../oidc", "path"),  # clients normalise '..': AWS would fetch another URL
        ("https://cp.example.com//oidc", "path"),
        ("https://cp.example.com/o%69dc", "path"),
        ("https://CP.example.com/oidc", "'cp.example.com'"),  # iss is compared as a string
        ("https://bücher.example/oidc", "'xn--bcher-kva.example'"),  # the ASCII form to write in both places
        ("https://cp.example.com:443/oidc", "has a port"),
    ],
)
async def test_an_issuer_url_that_cannot_be_served_or_matched_is_refused_naming_the_flag(
    issuer: str, words: str, tmp_path: Path
) -> None:
    """Defect: these were accepted; the first crashed the start, the others published a URL AWS cannot match."""
    data = tmp_path / "cp"
    data.mkdir(mode=0o700)
    service = ControlPlaneService(ControlPlaneConfig(data_dir=data, oidc_issuer=issuer, port=0))
    try:
        with pytest.raises(CredentialsError) as caught:
            await service.start()
    finally:
        await service.shutdown()
    assert "--oidc-issuer" in str(caught.value) and words in str(caught.value)


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["control-plane", "--data-dir", str(tmp_path / "d"), "--oidc-issuer", "https://cp.example.com/a{b"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and "--oidc-issuer" in err


@pytest.mark.parametrize("argv", [["--oidc-key-file", "k.json"], ["--database", "postgresql://h/db", "--oidc-issuer",
                                  "https://cp.example.com"]])  # fmt: skip
def test_a_key_file_without_issuer_or_a_database_without_key_file_is_one_line(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["control-plane", *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--oidc-key-file" in err
