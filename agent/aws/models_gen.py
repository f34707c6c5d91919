"""Generate the pruned AWS service models the delegate loads (``make models``).

botocore's full ec2 model is 3.5 MB of JSON: parsing it costs ~170 ms of blocked event loop and
~20 MiB of memory that never comes back, for the one ec2 operation we call. These files keep
only the operations the validator uses (and the shapes they reach), without documentation.
They are derived from the pinned botocore; ``tests/test_aws_models.py`` fails when they drift.

``endpoints.json`` is pruned the same way: botocore parses its 730 KB at the first client, for
every service in every partition, into 23,000 objects (6.8 MiB of a delegate's idle memory, and
objects every full garbage collection walks). The partitions stay whole; only the services a
delegate's clients can reach stay in them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from botocore.loaders import Loader

MODELS_DIR = Path(__file__).parent / "models"

#: Service -> the operations the validator calls.
OPERATIONS: dict[str, tuple[str, ...]] = {
    "sts": ("GetCallerIdentity", "AssumeRole", "AssumeRoleWithWebIdentity"),
    "ec2": ("DescribeRegions",),
    "iam": ("SimulatePrincipalPolicy",),
}


#: The endpoint prefixes a delegate's clients use: ours, and those the default credential chain
#: may create (SSO: ``portal.sso`` and ``oidc``).
ENDPOINT_SERVICES = ("ec2", "iam", "oidc", "portal.sso", "sts")


def prune_endpoints(endpoints: dict[str, Any]) -> dict[str, Any]:
    partitions = [
        {**p, "services": {k: v for k, v in p["services"].items() if k in ENDPOINT_SERVICES}}
        for p in endpoints["partitions"]
    ]
    return {**endpoints, "partitions": partitions}


def _strip_docs(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_docs(v) for k, v in value.items() if k not in ("documentation", "documentationUrl")}
    if isinstance(value, list):
        return [_strip_docs(v) for v in value]
    return value


def prune(model: dict[str, Any], operations: tuple[str, ...]) -> dict[str, Any]:
    shapes = model["shapes"]
    keep: set[str] = set()

    def walk(name: str) -> None:
        if name in keep:
            return
        keep.add(name)
        shape = shapes[name]
        for key in ("member", "key", "value"):
            if key in shape:
                walk(shape[key]["shape"])
        for member in shape.get("members", {}).values():
            walk(member["shape"])

    ops = {}
    for op in operations:
        spec = model["operations"][op]
        ops[op] = spec
        for key in ("input", "output"):
            if key in spec:
                walk(spec[key]["shape"])
        for err in spec.get("errors", []):
            walk(err["shape"])
    pruned = {**model, "operations": ops, "shapes": {k: shapes[k] for k in sorted(keep)}}
    return _strip_docs(pruned)  # type: ignore[no-any-return]


def render() -> dict[Path, str]:
    """The files that belong in MODELS_DIR for the installed botocore."""
    loader = Loader()
    out: dict[Path, str] = {}
    for service, operations in OPERATIONS.items():
        version = loader.determine_latest_version(service, "service-2")
        model = loader.load_service_model(service, "service-2", version)
        text = json.dumps(prune(model, operations), sort_keys=True, separators=(",", ":")) + "\n"
        out[Path(service) / version / "service-2.json"] = text
    endpoints = prune_endpoints(loader.load_data("endpoints"))
    out[Path("endpoints.json")] = json.dumps(endpoints, sort_keys=True, separators=(",", ":")) + "\n"
    return out


def main() -> int:
    files = render()
    for rel, text in files.items():
        path = MODELS_DIR / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
