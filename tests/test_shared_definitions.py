"""Concepts defined once and shared: the problems error, the identifier patterns, one name each."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.aws.connector import ConnectorInvalid, parse_connector
from agent.controlplane.openapi import CONNECTOR_SCHEMA
from agent.protocol.models import CreateTaskRequest, Problem
from agent.protocol.patterns import TAG_PATTERN, TAG_RE
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


@pytest.mark.parametrize("tag", ["eks", "team=a+b@c:d/e.f_g-h", "9lives", "-leading", "has space", "é", "x" * 129])
def test_one_tag_pattern_decides_for_wire_settings_connectors_and_the_schema(tag: str) -> None:
    """A tag is accepted or refused alike by the wire model, the settings, a connector and the OpenAPI schema."""
    wire_ok = _accepts(lambda: msgspec.convert({"type": "t", "payload": {}, "selectors": [tag]}, CreateTaskRequest))
    settings_ok = _accepts(lambda: load_settings({**_MINIMAL_ENV, "DELEGATE_TAGS": tag}))
    spec: dict[str, Any] = {"credential": {"type": "Irsa"}, "delegateSelectors": [tag]}
    connector = {"connector": {"name": "c", "type": "Aws", "spec": spec}}
    connector_ok = _accepts(lambda: parse_connector(connector))
    schema_items = CONNECTOR_SCHEMA["properties"]["connector"]["properties"]["spec"]["properties"]["delegateSelectors"]
    assert schema_items["items"]["pattern"].startswith(TAG_PATTERN.removesuffix("$"))
    assert wire_ok == settings_ok == connector_ok == bool(TAG_RE.match(tag))


_MINIMAL_ENV = {"MANAGER_HOST_AND_PORT": "https://cp", "DELEGATE_TOKEN": "t" * 20, "DELEGATE_NAME": "d"}


def _accepts(call: Callable[[], object]) -> bool:
    try:
        call()
    except (ProblemsError, msgspec.ValidationError):
        return False
    return True


def test_each_class_and_type_alias_name_is_defined_once_in_the_package() -> None:
    """One name per concept: no two modules define a class or type alias of the same name."""
    where: defaultdict[str, list[str]] = defaultdict(list)
    package = Path(__file__).resolve().parent.parent / "agent"
    for path in sorted(package.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                continue
            for name in names:
                if name.lstrip("_")[:1].isupper() and not name.isupper():  # CapWords: a class or an alias
                    where[name].append(str(path.relative_to(package)))
    twice = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert twice == {}
