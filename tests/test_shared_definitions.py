"""Concepts defined once and shared: the problems error, the identifier patterns, one name each."""

from __future__ import annotations

import pytest

from agent.aws.connector import ConnectorInvalid, parse_connector
from agent.protocol.models import Problem
from agent.protocol.problems import ProblemsError
from agent.runtime.settings import ConfigError, load_settings


def test_settings_and_connector_errors_share_one_problems_base() -> None:
    """Both list every problem, and read the same way: 'field: message; field: message'."""
    with pytest.raises(ProblemsError) as settings_error:
        load_settings({})
    assert isinstance(settings_error.value, ConfigError)
    with pytest.raises(ProblemsError) as connector_error:
        parse_connector({"connector": {"type": "Aws"}})
    assert isinstance(connector_error.value, ConnectorInvalid)
    error = ProblemsError([Problem(field="a", message="is bad"), Problem(field="b", message="is worse")])
    assert str(error) == "a: is bad; b: is worse"
    assert [p.field for p in error.problems] == ["a", "b"]
