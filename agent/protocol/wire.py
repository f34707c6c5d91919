"""The base of every wire model, and the scalar types every model shares.

The bottom of the protocol package: models and results both build on it, so neither imports
the other for these.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

#: An RFC 3339 timestamp; the schema says exactly what the server parses (format alone is advisory).
Timestamp = Annotated[
    datetime,
    msgspec.Meta(
        extra_json_schema={
            "format": "date-time",
            "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
            r"([Zz]|[+-][0-9]{2}:[0-9]{2})$",
        }
    ),
]

TaskStatus = Literal["SUCCESS", "FAILURE"]


class Wire(msgspec.Struct, rename="camel", kw_only=True, omit_defaults=False):
    """Base of every wire model: camelCase names, keyword-only construction."""
