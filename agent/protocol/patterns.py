r"""Every tag, name and identifier pattern, written once.

Each pattern is a plain string in the subset Python's ``re`` and JSON Schema (ECMA-262) agree on,
so the same text checks a wire model (through msgspec), documents the OpenAPI schema and checks
settings and connector documents. The ``Annotated`` types carry them into msgspec structs and
``msgspec.json.schema``; the compiled ``*_RE`` are for code that checks by hand to report every
problem at once.

In ECMA-262 ``$`` is the end of the text; in Python it also matches before a final newline, so
``"account.key\n"`` would pass. The compiled ``*_RE`` therefore end in ``\Z`` instead (``match``
is a full match), and the wire types end in ``(?!\n)$`` (msgspec searches with Python's ``re``;
the lookahead is ECMA-262 too, so the schema still says what the server checks).
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

#: Delegate tags and task selectors: one unambiguous alphabet, the same in every regex dialect.
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/=+@-]{0,127}$"
#: A delegate's name (``DELEGATE_NAME``); also one of its tags, so a subset of the tag alphabet.
DELEGATE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
#: The name before ``name:token`` in the control plane's delegate token list.
TOKEN_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # noqa: S105 - a pattern, not a password
#: A Harness entity identifier: letters, digits, ``_`` and ``$``, not starting with a digit.
CONNECTOR_IDENTIFIER_PATTERN = r"^[a-zA-Z_][0-9a-zA-Z_$]{0,127}$"
#: A Harness secret reference: ``account.NAME``, ``org.NAME`` or ``NAME`` (group 1: scope, group 2: name).
SECRET_REF_PATTERN = r"^(?:(account|org)\.)?([A-Za-z0-9_$-][A-Za-z0-9_.$-]{0,127})$"  # noqa: S105 - a pattern, not a secret
ACCESS_KEY_ID_PATTERN = r"^[A-Z0-9]{16,128}$"
EXTERNAL_ID_PATTERN = r"^[\w+=,.@:/-]{2,1224}$"
#: An IAM action to simulate, ``service:Action`` (wildcards allowed in the action).
IAM_ACTION_PATTERN = r"^[a-zA-Z0-9-]+:[A-Za-z0-9*?]+$"


def _python(pattern: str) -> str:
    """``pattern`` for Python's ``re``: its final ``$`` becomes ``\\Z``, the end of the text."""
    return pattern.removesuffix("$") + r"\Z"


def _wire(pattern: str) -> str:
    """``pattern`` for msgspec and the schema: no final newline in either dialect."""
    return pattern.removesuffix("$") + r"(?!\n)$"


TAG_RE = re.compile(_python(TAG_PATTERN))
DELEGATE_NAME_RE = re.compile(_python(DELEGATE_NAME_PATTERN))
TOKEN_NAME_RE = re.compile(_python(TOKEN_NAME_PATTERN))
CONNECTOR_IDENTIFIER_RE = re.compile(_python(CONNECTOR_IDENTIFIER_PATTERN))
SECRET_REF_RE = re.compile(_python(SECRET_REF_PATTERN))
ACCESS_KEY_ID_RE = re.compile(_python(ACCESS_KEY_ID_PATTERN))
EXTERNAL_ID_RE = re.compile(_python(EXTERNAL_ID_PATTERN))
IAM_ACTION_RE = re.compile(_python(IAM_ACTION_PATTERN))

Tag = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=_wire(TAG_PATTERN))]
TokenName = Annotated[str, msgspec.Meta(pattern=_wire(TOKEN_NAME_PATTERN))]
ConnectorIdentifier = Annotated[str, msgspec.Meta(pattern=_wire(CONNECTOR_IDENTIFIER_PATTERN))]
SecretRefText = Annotated[str, msgspec.Meta(pattern=_wire(SECRET_REF_PATTERN))]
AccessKeyId = Annotated[str, msgspec.Meta(pattern=_wire(ACCESS_KEY_ID_PATTERN))]
ExternalId = Annotated[str, msgspec.Meta(pattern=_wire(EXTERNAL_ID_PATTERN))]
IamAction = Annotated[str, msgspec.Meta(pattern=_wire(IAM_ACTION_PATTERN))]
