"""AWS partitions and regions, read from botocore's own partition data.

A GovCloud key cannot sign for a commercial region and the reverse, so the partition of the test
region decides the endpoints; a role ARN from another partition is a configuration error that is
caught before any call.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from botocore.loaders import Loader

_ARN_RE = re.compile(
    r"^arn:(?P<partition>[a-z0-9-]+):(?P<service>[a-z0-9-]*):(?P<region>[a-z0-9-]*):(?P<account>\d{12}|aws)?:(?P<resource>.+)$"
)
_ROLE_ARN_RE = re.compile(
    r"^arn:(?P<partition>aws[a-z0-9-]*):iam::(?P<account>\d{12}):role/(?P<path_name>[\w+=,.@/-]{1,512})$"
)


@dataclass(frozen=True)
class Partition:
    name: str
    dns_suffix: str
    regions: frozenset[str]

    @property
    def label(self) -> str:
        return {"aws": "commercial", "aws-us-gov": "GovCloud (US)", "aws-cn": "China"}.get(self.name, self.name)


@dataclass(frozen=True)
class PartitionTable:
    partitions: tuple[Partition, ...]

    def for_region(self, region: str) -> Partition | None:
        for p in self.partitions:
            if region in p.regions:
                return p
        return None

    def get(self, name: str) -> Partition | None:
        return next((p for p in self.partitions if p.name == name), None)

    @property
    def all_regions(self) -> list[str]:
        return sorted(r for p in self.partitions for r in p.regions)

    def suggest(self, region: str) -> str | None:
        """The closest known region names (all ties), for "did you mean" messages."""
        scored = sorted((_distance(region, r), r) for r in self.all_regions)
        if not scored or scored[0][0] > max(2, len(region) // 4):
            return None
        best = [r for d, r in scored if d == scored[0][0]][:3]
        return " or ".join(best)


def _distance(a: str, b: str) -> int:
    """Levenshtein distance (regions are short; this is cheap)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@functools.cache
def partition_table() -> PartitionTable:
    """Partitions from the installed botocore (parsed once; the data is immutable).

    ``partitions.json`` (7 KB) rather than ``endpoints.json`` (1.2 MB): the same partitions and
    regions for a millisecond instead of ~30 ms and 4.6 MiB. The ``*-global`` pseudo-regions
    name global endpoints, not places a connector can test in.
    """
    data = Loader().load_data("partitions")
    parts = tuple(
        Partition(
            name=p["id"],
            dns_suffix=p["outputs"]["dnsSuffix"],
            regions=frozenset(r for r in p["regions"] if not r.endswith("-global")),
        )
        for p in data["partitions"]
    )
    return PartitionTable(parts)


@dataclass(frozen=True)
class Arn:
    partition: str
    service: str
    region: str
    account: str
    resource: str

    @classmethod
    def parse(cls, text: str) -> Arn | None:
        m = _ARN_RE.match(text)
        if not m:
            return None
        return cls(m["partition"], m["service"], m["region"], m["account"] or "", m["resource"])


def parse_role_arn(text: str) -> tuple[str, str, str] | None:
    """(partition, account, path/name) of an IAM role ARN, or None when it is not one."""
    m = _ROLE_ARN_RE.match(text)
    if not m:
        return None
    return m["partition"], m["account"], m["path_name"]


def principal_for_simulation(caller_arn: str, known_role_arn: str | None) -> str | None:
    """The IAM ARN that iam:SimulatePrincipalPolicy accepts for a caller.

    An assumed-role session ARN (``arn:aws:sts::1:assumed-role/R/s``) must become the role's ARN.
    The session ARN does not carry the role's path, so a role ARN we assumed ourselves (which has
    it) is preferred. The account root cannot be simulated.
    """
    arn = Arn.parse(caller_arn)
    if arn is None:
        return None
    if arn.service == "iam" and arn.resource.startswith(("user/", "role/")):
        return caller_arn
    if arn.service == "sts" and arn.resource.startswith("assumed-role/"):
        role_name = arn.resource.split("/")[1]
        if known_role_arn:
            parsed = parse_role_arn(known_role_arn)
            if parsed and parsed[2].rsplit("/", 1)[-1] == role_name and parsed[1] == arn.account:
                return known_role_arn
        return f"arn:{arn.partition}:iam::{arn.account}:role/{role_name}"
    if arn.service == "sts" and arn.resource.startswith("federated-user/"):
        return None
    return None
