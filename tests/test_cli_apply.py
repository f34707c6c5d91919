"""`connector apply` with several documents: all or nothing, validated by the control plane's dry run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from agent.cli import EXIT_OK, EXIT_USAGE, main
from tests.conftest import API_KEY, ControlPlaneFactory, manual_connector

H = {"Authorization": f"Bearer {API_KEY}"}


async def run_cli(*argv: str) -> int:
    """Run the CLI in a thread: it is synchronous, and the control plane runs on this loop."""
    return await asyncio.to_thread(main, list(argv))


def bad_region(name: str) -> dict[str, Any]:
    doc = manual_connector(name)
    doc["connector"]["spec"]["credential"]["region"] = "us-est-1"
    return doc


async def test_one_invalid_document_means_none_is_applied_and_each_problem_is_placed(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every document is checked; each problem names its file, document number and identifier."""
    cp = await control_plane_factory()
    first, second = tmp_path / "a.yaml", tmp_path / "b.json"
    named = manual_connector("Named")
    named["connector"]["identifier"] = "named_one"
    named["connector"]["spec"]["delegateSelectors"] = ["Bad Tag"]
    first.write_text(yaml.safe_dump_all([manual_connector("One"), bad_region("Two"), named]))
    second.write_text(json.dumps(manual_connector("Three")))
    common = ("--control-plane", cp.url, "--api-key", API_KEY)

    code = await run_cli("connector", "apply", "-f", str(first), "-f", str(second), *common)

    captured = capsys.readouterr()
    assert code == EXIT_USAGE
    assert captured.out == ""
    err = captured.err.splitlines()
    assert f"delegate-agent: {first} document 2 (name 'Two'): the connector has 1 problem(s)" in err
    assert any(line.startswith("  connector.spec.credential.region: unknown region 'us-est-1'") for line in err)
    assert any(line.startswith(f"delegate-agent: {first} document 3 (identifier named_one):") for line in err)
    assert any(line.startswith("  connector.spec.delegateSelectors") for line in err)
    assert err[-1] == "delegate-agent: nothing applied: 2 problem(s) in 4 document(s)"
    assert "Traceback" not in captured.err
    assert await cp.core.store.connectors() == []


async def test_a_directory_applies_its_connector_files_in_name_order(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-f DIR` reads *.yaml, *.yml and *.json (sorted), skipping other files and subdirectories."""
    cp = await control_plane_factory()
    d = tmp_path / "connectors"
    (d / "nested").mkdir(parents=True)
    (d / "20-b.yml").write_text(yaml.safe_dump_all([manual_connector("Bee"), manual_connector("Cee")]))
    (d / "10-a.yaml").write_text(yaml.safe_dump(manual_connector("Ay")))
    (d / "30-c.json").write_text(json.dumps(manual_connector("Dee")))
    (d / "README.md").write_text("not a connector")
    (d / "nested" / "x.yaml").write_text(yaml.safe_dump(manual_connector("Nested")))
    common = ("--control-plane", cp.url, "--api-key", API_KEY)

    assert await run_cli("connector", "apply", "-f", str(d), *common) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out == ["connector/Ay created", "connector/Bee created", "connector/Cee created", "connector/Dee created"]

    (d / "40-d.yaml").write_text(yaml.safe_dump(manual_connector("Ay", delegateSelectors=["eks"])))
    assert await run_cli("connector", "apply", "-f", str(d), *common) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{d / '40-d.yaml'} document 1 (name 'Ay'): the identifier Ay is also {d / '10-a.yaml'} document 1" in err
    assert (await cp.core.get_connector("Ay")).body["connector"]["spec"]["delegateSelectors"] == []

    empty = tmp_path / "empty"
    empty.mkdir()
    assert await run_cli("connector", "apply", "-f", str(empty), *common) == EXIT_USAGE
    assert "holds no *.yaml, *.yml, *.json file" in capsys.readouterr().err


async def test_an_unreadable_file_among_several_is_reported_with_the_others(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken YAML file is one more problem: the valid files beside it are not applied either.

    A YAML date (which JSON cannot carry) is sent as text and judged by the server like any value.
    """
    cp = await control_plane_factory()
    good, broken, dated = tmp_path / "good.yaml", tmp_path / "broken.yaml", tmp_path / "dated.yaml"
    good.write_text(yaml.safe_dump(manual_connector("Good")))
    broken.write_text("connector: [")
    dated.write_text("connector: {name: Dated, when: 2024-01-01}\n")
    files = ("-f", str(good), "-f", str(broken), "-f", str(dated))
    code = await run_cli("connector", "apply", *files, "--control-plane", cp.url, "--api-key", API_KEY)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert f"{broken} is not valid YAML or JSON" in err
    assert "  connector.when: unknown field" in err.splitlines()
    assert "nothing applied: 2 problem(s) in 3 document(s)" in err
    assert "Traceback" not in err
    assert await cp.core.store.connectors() == []


async def test_dry_run_validates_and_stores_nothing(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """`?dryRun=true` answers as the apply would, with dryRun set, and leaves the store alone."""
    cp = await control_plane_factory()
    url = cp.url + "/api/v1/connectors"
    async with http.post(url, params={"dryRun": "true"}, json=manual_connector("Dry"), headers=H) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert (body["identifier"], body["outcome"], body["dryRun"]) == ("Dry", "created", True)
    assert await cp.core.store.get_connector("Dry") is None

    async with http.post(url, json=manual_connector("Dry"), headers=H) as resp:
        assert resp.status == 201
        assert (await resp.json())["dryRun"] is False
    changed = manual_connector("Dry", delegateSelectors=["eks"])
    async with http.put(url + "/Dry", params={"dryRun": "1"}, json=changed, headers=H) as resp:
        body = await resp.json()
    assert (resp.status, body["outcome"], body["connector"]["connector"]["connector"]["spec"]["delegateSelectors"]) == (
        200,
        "updated",
        ["eks"],
    )
    assert (await cp.core.get_connector("Dry")).body["connector"]["spec"]["delegateSelectors"] == []

    async with http.post(url, params={"dryRun": "true"}, json=bad_region("Bad"), headers=H) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["problems"][0]["field"] == "connector.spec.credential.region"
    async with http.post(url, params={"dryRun": "maybe"}, json=manual_connector("Dry"), headers=H) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["problems"][0]["field"] == "dryRun"
