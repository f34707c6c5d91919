"""Real-shaped Harness connector documents (tests/data/connectors): each parses, or fails as intended."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.aws.connector import AwsConnector, ConnectorInvalid, SecretRef, parse_connector

CORPUS = Path(__file__).parent / "data" / "connectors"
EXPECTATIONS: dict[str, dict[str, Any]] = yaml.safe_load((CORPUS / "expectations.yaml").read_text())
DOCUMENTS = sorted(p.name for p in CORPUS.iterdir() if p.name != "expectations.yaml")


def plain(value: Any) -> Any:
    """A connector attribute as the expectations file writes it (references as text, tuples as lists)."""
    if isinstance(value, SecretRef):
        return value.raw
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def test_every_document_has_an_expectation_and_every_expectation_a_document() -> None:
    """The corpus and its expectations name the same files."""
    assert sorted(EXPECTATIONS) == DOCUMENTS


@pytest.mark.parametrize("name", DOCUMENTS)
def test_a_harness_document_parses_or_fails_as_intended(name: str) -> None:
    """Accepted documents give the expected connector (and notice); rejected ones name exactly the
    expected fields, each with the expected words."""
    expected = EXPECTATIONS[name]
    document = yaml.safe_load((CORPUS / name).read_text())  # JSON is YAML too
    if "problems" in expected:
        with pytest.raises(ConnectorInvalid) as err:
            parse_connector(document)
        found = {p.field: p.message for p in err.value.problems}
        assert sorted(found) == sorted(expected["problems"]), found
        for field, words in expected["problems"].items():
            assert words in found[field], (field, found[field])
        return
    connector = parse_connector(document)
    attributes = {f.name for f in fields(AwsConnector)}
    for attribute, value in expected["parses"].items():
        assert attribute in attributes, attribute
        assert plain(getattr(connector, attribute)) == value, attribute
    if "notice" in expected:
        assert len(connector.notices) == 1 and expected["notice"] in connector.notices[0], connector.notices
    else:
        assert connector.notices == ()
    # What the control plane stores is plain Harness YAML again, and reads back to the same connector.
    again = parse_connector(connector.to_document())
    assert again == connector and again.notices == ()
