"""The Harness AWS connector, parsed and checked once, at the edge.

Input is the Harness connector document (YAML or JSON), as the UI writes it or as Harness's API
exports it (``{"connector": {...}, "createdAt": ..., "status": {...}, ...}``, or that inside the API's
``{"status": "SUCCESS", "data": ...}`` answer; only ``connector`` is read, and one notice says what
else was ignored)::

    connector:
      name: Prod account
      identifier: prod_account          # derived from the name when absent, as Harness does
      type: Aws
      spec:
        credential:
          type: ManualConfig            # or InheritFromDelegate, Irsa, OidcAuthentication
          spec: {accessKey: AKIA..., secretKeyRef: account.aws_secret}   # sessionTokenRef for temporary keys
          # OidcAuthentication: spec: {iamRoleArn: arn:aws:iam::...:role/x, audience: sts.amazonaws.com}
          crossAccountAccess: {crossAccountRoleArn: arn:aws:iam::...:role/x, externalId: ...}
          region: us-east-1
        delegateSelectors: [eks, prod]
        executeOnDelegate: true

Harness ignores unknown and misplaced fields without a word (``@JsonIgnoreProperties(ignoreUnknown
= true)``), so a ``crossAccountAccess`` one level too high is silently never assumed. Here a field in
the wrong place is a problem that names where it belongs, and a Harness expression (``<+...>``),
which only Harness evaluates, is a problem that says what to write instead.

Every problem is collected and reported together, each naming its field, so a user fixes a
connector in one round. Secret *values* never appear here: only references to them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent._values import clip, quoted
from agent.aws.partitions import parse_role_arn, partition_table
from agent.protocol.models import Problem
from agent.protocol.patterns import (
    ACCESS_KEY_ID_RE,
    CONNECTOR_IDENTIFIER_RE,
    EXTERNAL_ID_RE,
    IAM_ACTION_RE,
    SECRET_REF_RE,
    TAG_RE,
)
from agent.protocol.problems import ProblemsError

CredentialType = Literal["InheritFromDelegate", "ManualConfig", "Irsa", "OidcAuthentication"]
CREDENTIAL_TYPES: tuple[CredentialType, ...] = ("InheritFromDelegate", "ManualConfig", "Irsa", "OidcAuthentication")
BackoffKind = Literal["FixedDelayBackoffStrategy", "EqualJitterBackoffStrategy", "FullJitterBackoffStrategy"]

DEFAULT_REGION = "us-east-1"
#: The audience AWS's IAM identity providers expect by default (Harness's too).
DEFAULT_OIDC_AUDIENCE = "sts.amazonaws.com"
_AUDIENCE_RE = re.compile(r"[\x21-\x7e]{1,255}")
DEFAULT_ASSUME_ROLE_SECONDS = 3600

# Harness reserves these words as identifiers (entity identifier reference).
_RESERVED = frozenset(
    ["or", "and", "eq", "ne", "lt", "gt", "le", "ge", "div", "mod", "not", "null", "true", "false", "new"]
)


class ConnectorInvalid(ProblemsError):
    """The connector document has problems; all of them are in ``problems``."""


@dataclass(frozen=True)
class SecretRef:
    """A Harness secret reference (``account.NAME``, ``org.NAME`` or ``NAME``)."""

    raw: str
    scope: Literal["account", "org", "project"]
    name: str

    def __str__(self) -> str:
        return self.raw


@dataclass(frozen=True)
class CrossAccountAccess:
    role_arn: str
    external_id: str | None = field(default=None, repr=False)
    duration_seconds: int = DEFAULT_ASSUME_ROLE_SECONDS


@dataclass(frozen=True)
class BackoffStrategy:
    """``awsSdkClientBackOffStrategyOverride``: delays in milliseconds, as Harness has them."""

    kind: BackoffKind
    retry_count: int
    base_delay_ms: int
    max_backoff_ms: int


@dataclass(frozen=True)
class AwsConnector:
    identifier: str
    name: str
    credential_type: CredentialType
    region: str = DEFAULT_REGION
    region_explicit: bool = False
    description: str | None = None
    org_identifier: str | None = None
    project_identifier: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    access_key: str | None = None
    access_key_ref: SecretRef | None = None
    secret_key_ref: SecretRef | None = None
    #: The session token of temporary keys (``ASIA...``), resolved like the secret key.
    session_token_ref: SecretRef | None = None
    #: OidcAuthentication: the role the control plane's token is exchanged for, and the token's audience.
    oidc_role_arn: str | None = None
    oidc_audience: str = DEFAULT_OIDC_AUDIENCE
    cross_account: CrossAccountAccess | None = None
    delegate_selectors: tuple[str, ...] = ()
    execute_on_delegate: bool = True
    backoff: BackoffStrategy | None = None
    permissions: tuple[str, ...] = ()
    permission_resources: tuple[str, ...] = ()
    account_identifier: str | None = None
    #: Harness's ``spec.proxy``, kept as written; the delegate's own proxy settings decide the route.
    proxy: bool = False
    #: Harness's ``spec.ignoreTestConnection`` (skip the test when saving), kept as written: ``connector
    #: apply`` never tests, and ``connector test`` always does.
    ignore_test_connection: bool = False
    #: Our extension (``connector.testInterval``): seconds between the control plane's scheduled tests of
    #: this connector, ``0`` for none; None means the control plane's default (30 minutes).
    test_interval: float | None = None
    #: What the parser accepted but did not use (an API export's metadata), said once to the user.
    #: Not part of the connector: equality and ``to_document`` ignore it.
    notices: tuple[str, ...] = field(default=(), compare=False)

    @property
    def partition(self) -> str:
        part = partition_table().for_region(self.region)
        return part.name if part else "aws"

    def to_document(self) -> dict[str, Any]:
        """The normalised Harness document (what the control plane stores and returns)."""
        cred_spec: dict[str, Any] | None = None
        if self.credential_type == "ManualConfig":
            cred_spec = {}
            if self.access_key is not None:
                cred_spec["accessKey"] = self.access_key
            if self.access_key_ref is not None:
                cred_spec["accessKeyRef"] = self.access_key_ref.raw
            if self.secret_key_ref is not None:
                cred_spec["secretKeyRef"] = self.secret_key_ref.raw
            if self.session_token_ref is not None:
                cred_spec["sessionTokenRef"] = self.session_token_ref.raw
        elif self.credential_type == "OidcAuthentication":
            cred_spec = {"iamRoleArn": self.oidc_role_arn}
            if self.oidc_audience != DEFAULT_OIDC_AUDIENCE:
                cred_spec["audience"] = self.oidc_audience
        credential: dict[str, Any] = {"type": self.credential_type, "spec": cred_spec}
        if self.cross_account is not None:
            xa: dict[str, Any] = {"crossAccountRoleArn": self.cross_account.role_arn}
            if self.cross_account.external_id is not None:
                xa["externalId"] = self.cross_account.external_id
            if self.cross_account.duration_seconds != DEFAULT_ASSUME_ROLE_SECONDS:
                xa["durationSeconds"] = self.cross_account.duration_seconds
            credential["crossAccountAccess"] = xa
        if self.region_explicit:
            credential["region"] = self.region
        spec: dict[str, Any] = {
            "credential": credential,
            "delegateSelectors": list(self.delegate_selectors),
            "executeOnDelegate": self.execute_on_delegate,
        }
        if self.proxy:
            spec["proxy"] = True
        if self.ignore_test_connection:
            spec["ignoreTestConnection"] = True
        if self.backoff is not None:
            b = self.backoff
            bspec: dict[str, Any] = {"retryCount": b.retry_count}
            if b.kind == "FixedDelayBackoffStrategy":
                bspec["fixedBackoff"] = b.base_delay_ms
            else:
                bspec.update(baseDelay=b.base_delay_ms, maxBackoffTime=b.max_backoff_ms)
            spec["awsSdkClientBackOffStrategyOverride"] = {"type": b.kind, "spec": bspec}
        if self.permissions:
            pc: dict[str, Any] = {"actions": list(self.permissions)}
            if self.permission_resources:
                pc["resources"] = list(self.permission_resources)
            spec["permissionCheck"] = pc
        body: dict[str, Any] = {"name": self.name, "identifier": self.identifier}
        if self.description is not None:
            body["description"] = self.description
        if self.org_identifier is not None:
            body["orgIdentifier"] = self.org_identifier
        if self.project_identifier is not None:
            body["projectIdentifier"] = self.project_identifier
        if self.account_identifier is not None:
            body["accountIdentifier"] = self.account_identifier
        body["tags"] = dict(self.tags)
        if self.test_interval is not None:
            body["testInterval"] = _format_interval(self.test_interval)
        body["type"] = "Aws"
        body["spec"] = spec
        return {"connector": body}


def derive_identifier(name: str) -> str:
    """Harness's rule: letters, digits, ``_`` and ``$``, not starting with a digit."""
    ident = re.sub(r"[^0-9a-zA-Z_$]", "_", name.strip())
    if not ident or not re.match(r"[a-zA-Z_]", ident[0]):
        ident = "_" + ident
    return ident[:128]


def parse_secret_ref(text: str) -> SecretRef | None:
    m = SECRET_REF_RE.match(text)
    if not m or ".." in text:
        return None
    scope = m[1] or "project"
    return SecretRef(raw=text, scope=scope, name=m[2])  # type: ignore[arg-type]


def _looks_like_secret_value(text: str) -> bool:
    # A 40-character AWS secret access key pasted where a reference belongs.
    return len(text) >= 30 and (
        any(c in text for c in "/+=")
        or (any(c.isdigit() for c in text) and any(c.islower() for c in text) and any(c.isupper() for c in text))
    )


#: Problems listed one by one; past this a document is hostile or not a connector, and one line counts
#: the rest (so a megabyte of unknown keys is not answered with four, nor costs seconds of "did you mean").
MAX_PROBLEMS = 50


class _Checker:
    """Collects problems while walking a document."""

    def __init__(self) -> None:
        self._problems: list[Problem] = []
        self._more = 0

    @property
    def full(self) -> bool:
        return len(self._problems) >= MAX_PROBLEMS

    @property
    def problems(self) -> list[Problem]:
        if not self._more:
            return self._problems
        return [*self._problems, Problem(field="document", message=f"and {self._more:,} more problems")]

    @property
    def total(self) -> int:
        """Every problem found, those listed and those only counted."""
        return len(self._problems) + self._more

    def invalid(self) -> ConnectorInvalid:
        return ConnectorInvalid(self.problems, total=self.total)

    def add(self, path: str, message: str) -> None:
        if self.full:
            self._more += 1
        else:
            self._problems.append(Problem(field=path, message=message))

    def mapping(self, value: Any, path: str, *, required: bool = True) -> Mapping[str, Any] | None:
        if value is None:
            if required:
                self.add(path, "is required")
            return None
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping, not {_kind(value)}")
            return None
        return value

    def string(
        self, value: Any, path: str, *, required: bool = False, max_len: int = 1024, expressions: bool = False
    ) -> str | None:
        """A string field; ``""`` counts as absent (Harness writes it for unset identifiers).

        A Harness expression (``<+...>``) is a problem unless ``expressions`` (free text).
        """
        if value is None or value == "":
            if required:
                self.add(path, "is required")
            return None
        if not isinstance(value, str):
            self.add(path, f"must be a string, not {_kind(value)}")
            return None
        if len(value) > max_len:
            self.add(path, f"is longer than {max_len} characters")
            return None
        if not expressions and "<+" in value:
            self.add(path, expression_problem(path, value))
            return None
        return value

    def flag(self, value: Any, path: str, *, default: bool) -> bool:
        """A boolean field; ``null`` is the default."""
        if value is None:
            return default
        if not isinstance(value, bool):
            self.add(path, f"must be true or false, not {_kind(value)}")
            return default
        return value

    def unknown(self, obj: Mapping[str, Any], allowed: set[str], path: str, *, why: str = "unknown field") -> None:
        """Name every key not in ``allowed``: where it belongs if it is misplaced, else the closest match."""
        for key in obj:
            if key in allowed:
                continue
            if self.full:
                self._more += 1
                continue
            where = f"{path}.{clip(str(key))}"
            home = _HOME.get(str(key))
            if home is not None and home != where:
                self.add(where, f"is in the wrong place (Harness ignores it here without a word): move it to {home}")
                continue
            hint = _closest(str(key), allowed)
            self.add(where, why + (f" (did you mean {hint}?)" if hint else ""))


#: Where each field belongs, for the ones people put one level too high or too low.
_HOME = {
    "accountIdentifier": "connector.accountIdentifier",
    "orgIdentifier": "connector.orgIdentifier",
    "projectIdentifier": "connector.projectIdentifier",
    "description": "connector.description",
    "tags": "connector.tags",
    "credential": "connector.spec.credential",
    "delegateSelectors": "connector.spec.delegateSelectors",
    "executeOnDelegate": "connector.spec.executeOnDelegate",
    "proxy": "connector.spec.proxy",
    "ignoreTestConnection": "connector.spec.ignoreTestConnection",
    "awsSdkClientBackOffStrategyOverride": "connector.spec.awsSdkClientBackOffStrategyOverride",
    "permissionCheck": "connector.spec.permissionCheck",
    "crossAccountAccess": "connector.spec.credential.crossAccountAccess",
    "region": "connector.spec.credential.region",
    "testRegion": "connector.spec.credential.region",
    "accessKey": "connector.spec.credential.spec.accessKey",
    "accessKeyRef": "connector.spec.credential.spec.accessKeyRef",
    "secretKeyRef": "connector.spec.credential.spec.secretKeyRef",
    "sessionTokenRef": "connector.spec.credential.spec.sessionTokenRef",
    "crossAccountRoleArn": "connector.spec.credential.crossAccountAccess.crossAccountRoleArn",
    "externalId": "connector.spec.credential.crossAccountAccess.externalId",
}

#: The reference field to write instead of an expression in each secret field.
_REF_FIELD = {
    "accessKey": "accessKeyRef",
    "accessKeyRef": "accessKeyRef",
    "secretKeyRef": "secretKeyRef",
    "sessionTokenRef": "sessionTokenRef",
}
_SECRET_EXPRESSION_RE = re.compile(r"""<\+secrets\.getValue\(\s*["']([^"']+)["']\s*\)>""")


def expression_problem(path: str, value: str) -> str:
    """What to write instead of a Harness expression, which only Harness itself evaluates."""
    field_name = path.rsplit(".", 1)[-1].split("[", 1)[0]
    secret = _SECRET_EXPRESSION_RE.fullmatch(value.strip())
    if secret is not None:
        ref = _REF_FIELD.get(field_name)
        if ref is not None:
            return (
                f"is a Harness expression, which this delegate does not evaluate: "
                f"write {ref}: {secret[1]} (the secret's reference) instead"
            )
        return (
            "is a Harness secret expression, which this delegate does not evaluate: secrets are read "
            "only through accessKeyRef, secretKeyRef and sessionTokenRef"
        )
    return "is a Harness expression (<+...>), which this delegate does not evaluate: write the value itself"


def _kind(value: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


#: ``30m``, ``2h``, ``90s``, ``1h30m``, or ``0`` (no scheduled tests).
_INTERVAL_RE = re.compile(r"^(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?$")
#: Scheduled tests at most this often: each is a task on a delegate and two AWS calls.
MIN_TEST_INTERVAL = 60.0
MAX_TEST_INTERVAL = 7 * 86400.0


def parse_interval(text: str) -> float:
    """``30m``, ``2h``, ``1h30m``, ``90s``, plain seconds, or ``0``: seconds (ValueError naming the text)."""
    text = text.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    match = _INTERVAL_RE.match(text) if text.isascii() else None
    if match is None or not any(match.groups()):
        raise ValueError(f"{quoted(text)} is not a duration such as 30m, 2h or 1h30m (or 0 for none)")
    h, m, s = match.groups()
    if (h is not None and m is not None and int(m) >= 60) or ((h or m) is not None and s is not None and int(s) >= 60):
        raise ValueError(f"{quoted(text)} is not a duration: minutes and seconds after a larger unit stay below 60")
    return float(int(h or 0) * 3600 + int(m or 0) * 60 + int(s or 0))


def _test_interval(c: _Checker, value: Any) -> float | None:
    """``connector.testInterval``: how often the control plane re-tests this connector."""
    if value is None:
        return None
    path = "connector.testInterval"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        c.add(path, "must be a duration such as 30m, 2h or 1h30m, or 0 for no scheduled tests")
        return None
    text = str(value).strip()[:40]
    try:
        total = parse_interval(text)
    except ValueError as exc:
        c.add(path, str(exc))
        return None
    if total == 0:
        return 0.0
    if not MIN_TEST_INTERVAL <= total <= MAX_TEST_INTERVAL:
        c.add(path, f"{quoted(text)} must be between 1m and 168h (or 0 for no scheduled tests)")
        return None
    return total


def _format_interval(seconds: float) -> str:
    if seconds <= 0:
        return "0"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n) or "0"


def _closest(key: str, options: set[str]) -> str | None:
    m = difflib.get_close_matches(key, sorted(options), n=1, cutoff=0.7)
    return m[0] if m else None


_CONNECTOR_KEYS = {
    "name",
    "identifier",
    "description",
    "accountIdentifier",
    "orgIdentifier",
    "projectIdentifier",
    "tags",
    "type",
    "spec",
    "testInterval",
}
_SPEC_KEYS = {
    "credential",
    "delegateSelectors",
    "executeOnDelegate",
    "proxy",
    "ignoreTestConnection",
    "awsSdkClientBackOffStrategyOverride",
    "permissionCheck",
}
_CRED_KEYS = {"type", "spec", "crossAccountAccess", "region"}
_MANUAL_KEYS = {"accessKey", "accessKeyRef", "secretKeyRef", "sessionTokenRef"}
#: What Harness's API answers around ``connector`` (ConnectorResponseDTO): metadata, not the connector.
_EXPORT_KEYS = {
    "createdAt",
    "lastModifiedAt",
    "status",
    "harnessManaged",
    "activityDetails",
    "gitDetails",
    "entityValidityDetails",
    "governanceMetadata",
    "isFavorite",
}
#: Harness's API answer around that (ResponseDTO): ``data`` holds the export.
_RESPONSE_KEYS = {"status", "data", "metaData", "correlationId"}
_XA_KEYS = {"crossAccountRoleArn", "externalId", "durationSeconds"}


def parse_connector(document: Any) -> AwsConnector:
    """Check a Harness connector document and return the typed connector.

    Raises :class:`ConnectorInvalid` listing every problem found.
    """
    c = _Checker()
    root = c.mapping(document, "document")
    if root is None:
        raise c.invalid()
    root, notices = _unwrap_export(root)
    if "connector" not in root:
        if isinstance(root.get("content"), list):  # the API's list answer: data.content[].connector
            c.add("data.content", "is Harness's list of connectors: apply each entry of data.content on its own")
        else:
            c.add("connector", "is required: the document's top level must be 'connector:' (Harness format)")
        raise c.invalid()
    conn = c.mapping(root.get("connector"), "connector")
    if conn is None:
        raise c.invalid()
    c.unknown(root, {"connector", *_EXPORT_KEYS}, "document")
    c.unknown(conn, _CONNECTOR_KEYS, "connector")

    name = c.string(conn.get("name"), "connector.name", required=True, max_len=128)
    identifier = c.string(conn.get("identifier"), "connector.identifier", max_len=128)
    if identifier is None and name:
        identifier = derive_identifier(name)
    if identifier is not None:
        if not CONNECTOR_IDENTIFIER_RE.match(identifier):
            c.add(
                "connector.identifier",
                f"{quoted(identifier)} must start with a letter or '_' and contain only "
                "letters, digits, '_' and '$' (at most 128)",
            )
        elif identifier in _RESERVED:
            c.add("connector.identifier", f"{quoted(identifier)} is a reserved word")
    description = c.string(conn.get("description"), "connector.description", max_len=1024, expressions=True)
    account = c.string(conn.get("accountIdentifier"), "connector.accountIdentifier", max_len=128)
    org = c.string(conn.get("orgIdentifier"), "connector.orgIdentifier", max_len=128)
    project = c.string(conn.get("projectIdentifier"), "connector.projectIdentifier", max_len=128)
    for path, value in (("connector.orgIdentifier", org), ("connector.projectIdentifier", project)):
        # Harness's identifier rule; it also keeps an OIDC token's sub (connector:<org>/<project>/<id>) from
        # being forged: an org named "a/b" would otherwise match a trust policy's "connector:a/b/*".
        if value and not CONNECTOR_IDENTIFIER_RE.match(value):
            c.add(
                path, f"{quoted(value)} must start with a letter or '_' and contain only letters, digits, '_' and '$'"
            )
    tags = _tags(c, conn.get("tags"))
    test_interval = _test_interval(c, conn.get("testInterval"))

    ctype = conn.get("type")
    if ctype is None:
        c.add("connector.type", "is required (Aws)")
    elif ctype != "Aws":
        extra = " (did you mean Aws?)" if isinstance(ctype, str) and ctype.lower() == "aws" else ""
        c.add("connector.type", f"{quoted(ctype)} is not supported: this delegate validates Aws connectors{extra}")

    spec = c.mapping(conn.get("spec"), "connector.spec")
    if spec is None:
        raise c.invalid()
    c.unknown(spec, _SPEC_KEYS, "connector.spec")

    selectors = _selectors(c, spec.get("delegateSelectors"), "connector.spec.delegateSelectors")
    execute_on_delegate = c.flag(spec.get("executeOnDelegate"), "connector.spec.executeOnDelegate", default=True)
    proxy = c.flag(spec.get("proxy"), "connector.spec.proxy", default=False)
    ignore_test = c.flag(spec.get("ignoreTestConnection"), "connector.spec.ignoreTestConnection", default=False)

    cred = c.mapping(spec.get("credential"), "connector.spec.credential")
    ctype_cred: CredentialType | None = None
    access_key = access_key_ref = secret_key_ref = session_token_ref = None
    oidc_role_arn, oidc_audience = None, DEFAULT_OIDC_AUDIENCE
    cross: CrossAccountAccess | None = None
    region, region_explicit = DEFAULT_REGION, False
    if cred is not None:
        c.unknown(cred, _CRED_KEYS, "connector.spec.credential")
        raw_type = cred.get("type")
        if raw_type in CREDENTIAL_TYPES:
            ctype_cred = raw_type
        elif raw_type is None:
            c.add("connector.spec.credential.type", "is required: one of " + ", ".join(CREDENTIAL_TYPES))
        else:
            c.add("connector.spec.credential.type", f"{quoted(raw_type)} is not one of " + ", ".join(CREDENTIAL_TYPES))

        raw_region = cred.get("region")
        if raw_region is not None:
            r = c.string(raw_region, "connector.spec.credential.region", max_len=64)
            if r is not None:
                if partition_table().for_region(r) is None:
                    hint = partition_table().suggest(r)
                    c.add(
                        "connector.spec.credential.region",
                        f"unknown region {quoted(r)}" + (f" (did you mean {hint}?)" if hint else ""),
                    )
                else:
                    region, region_explicit = r, True

        cred_spec_raw = cred.get("spec")
        if ctype_cred == "ManualConfig":
            mspec = c.mapping(cred_spec_raw, "connector.spec.credential.spec")
            if mspec is not None:
                access_key, access_key_ref, secret_key_ref, session_token_ref = _manual(c, mspec, cred)
        elif ctype_cred == "InheritFromDelegate" and cred_spec_raw is not None:
            ispec = c.mapping(cred_spec_raw, "connector.spec.credential.spec", required=False)
            if ispec is not None:
                c.unknown(ispec, {"delegateSelectors"}, "connector.spec.credential.spec")
                legacy = _selectors(
                    c, ispec.get("delegateSelectors"), "connector.spec.credential.spec.delegateSelectors"
                )
                selectors = tuple(dict.fromkeys(selectors + legacy))
        elif ctype_cred == "Irsa" and cred_spec_raw is not None:
            irsa = c.mapping(cred_spec_raw, "connector.spec.credential.spec", required=False)
            if irsa is not None:
                c.unknown(
                    irsa,
                    set(),
                    "connector.spec.credential.spec",
                    why="Irsa takes no fields: the role comes from the delegate's service account "
                    "(eks.amazonaws.com/role-arn)",
                )

        elif ctype_cred == "OidcAuthentication" and cred_spec_raw is None:
            c.add(
                "connector.spec.credential.spec",
                "is required for OidcAuthentication: {iamRoleArn: arn:aws:iam::ACCOUNT:role/NAME}, the role the "
                "control plane's OIDC token is exchanged for",
            )
        elif ctype_cred == "OidcAuthentication":
            ospec = c.mapping(cred_spec_raw, "connector.spec.credential.spec")
            if ospec is not None:
                oidc_role_arn, oidc_audience = _oidc(c, ospec, region)

        xa_raw = cred.get("crossAccountAccess")
        if xa_raw is not None:
            cross = _cross_account(c, xa_raw, region)

    if ctype_cred in ("InheritFromDelegate", "Irsa"):
        if not selectors and not spec.get("delegateSelectors"):  # given but invalid: already said
            c.add(
                "connector.spec.delegateSelectors",
                "Delegate Selector cannot be null for inherit from delegate credential type: name the tags of "
                "the delegates whose own identity should be used",
            )
        if execute_on_delegate is False:
            c.add(
                "connector.spec.executeOnDelegate",
                f"Connector with credential type {ctype_cred} does not support validation through harness: "
                "the credentials exist only on the delegate, so set executeOnDelegate: true",
            )

    backoff = _backoff(c, spec.get("awsSdkClientBackOffStrategyOverride"))
    permissions, resources = _permission_check(c, spec.get("permissionCheck"))

    if c.problems:
        raise c.invalid()
    assert name is not None and identifier is not None and ctype_cred is not None
    return AwsConnector(
        identifier=identifier,
        name=name,
        description=description,
        test_interval=test_interval,
        org_identifier=org,
        project_identifier=project,
        tags=tags,
        account_identifier=account,
        credential_type=ctype_cred,
        region=region,
        region_explicit=region_explicit,
        access_key=access_key,
        access_key_ref=access_key_ref,
        secret_key_ref=secret_key_ref,
        session_token_ref=session_token_ref,
        oidc_role_arn=oidc_role_arn,
        oidc_audience=oidc_audience,
        cross_account=cross,
        delegate_selectors=selectors,
        execute_on_delegate=execute_on_delegate,
        proxy=proxy,
        ignore_test_connection=ignore_test,
        notices=notices,
        backoff=backoff,
        permissions=permissions,
        permission_resources=resources,
    )


def _unwrap_export(root: Mapping[str, Any]) -> tuple[Mapping[str, Any], tuple[str, ...]]:
    """The document inside a Harness API export, and one notice naming what was ignored around it.

    Two shapes: the connector with its metadata (``{"connector", "createdAt", "status", ...}``), and
    that inside the API's answer (``{"status": "SUCCESS", "data": {...}, "correlationId"}``).
    """
    ignored: list[str] = []
    data = root.get("data")
    if "connector" not in root and isinstance(data, Mapping) and set(root) <= _RESPONSE_KEYS:
        ignored = [k for k in root if k != "data"]
        root = data
    ignored += [k for k in root if k in _EXPORT_KEYS and root[k] is not None]
    if not ignored:
        return root, ()
    return root, (
        "read .connector from a Harness API export; ignored what Harness keeps around it: " + ", ".join(ignored),
    )


def _tags(c: _Checker, raw: Any) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        c.add("connector.tags", f"must be a mapping of key: value, not {_kind(raw)}")
        return ()
    out = []
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str | int | float | bool | type(None)):
            c.add(f"connector.tags.{k}", "tag keys and values must be strings")
            continue
        out.append((k, "" if v is None else str(v)))
    return tuple(out)


def _selectors(c: _Checker, raw: Any, path: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        c.add(path, f"must be a list of delegate tags, not {_kind(raw)}")
        return ()
    out: list[str] = []
    for i, tag in enumerate(raw):
        if isinstance(tag, str) and "<+" in tag:
            c.add(f"{path}[{i}]", expression_problem(path, tag))
        elif not isinstance(tag, str) or not TAG_RE.match(tag):
            c.add(f"{path}[{i}]", "a tag has letters, digits and _.:/=+@- (starting with a letter or digit)")
        else:
            out.append(tag)
    return tuple(dict.fromkeys(out))


def _manual(
    c: _Checker, spec: Mapping[str, Any], credential: Mapping[str, Any]
) -> tuple[str | None, SecretRef | None, SecretRef | None, SecretRef | None]:
    base = "connector.spec.credential.spec"
    c.unknown(spec, _MANUAL_KEYS, base)

    def given(key: str) -> bool:
        # Present, even if invalid or one level too high: its own problem is already said.
        return spec.get(key) not in (None, "") or credential.get(key) not in (None, "")

    access_key = c.string(spec.get("accessKey"), f"{base}.accessKey", max_len=128)
    raw_ak_ref = c.string(spec.get("accessKeyRef"), f"{base}.accessKeyRef", max_len=256)
    raw_sk_ref = c.string(spec.get("secretKeyRef"), f"{base}.secretKeyRef", max_len=256)
    raw_st_ref = c.string(spec.get("sessionTokenRef"), f"{base}.sessionTokenRef", max_len=256)
    if access_key is not None and raw_ak_ref is not None:
        c.add(f"{base}.accessKey", "give accessKey or accessKeyRef, not both")
    elif not given("accessKey") and not given("accessKeyRef"):
        c.add(f"{base}.accessKey", "is required (or accessKeyRef, a secret reference)")
    if access_key is not None and not ACCESS_KEY_ID_RE.match(access_key):
        c.add(
            f"{base}.accessKey",
            "does not look like an AWS access key ID (16 to 128 capital letters and digits, e.g. AKIA...)",
        )
    ak_ref = _ref(c, raw_ak_ref, f"{base}.accessKeyRef")
    if not given("secretKeyRef"):
        c.add(f"{base}.secretKeyRef", "is required: a secret reference such as account.aws_secret_key")
    sk_ref = _secret_ref(c, raw_sk_ref, f"{base}.secretKeyRef", "a secret key")
    st_ref = _secret_ref(c, raw_st_ref, f"{base}.sessionTokenRef", "a session token")
    return access_key, ak_ref, sk_ref, st_ref


def _secret_ref(c: _Checker, raw: str | None, path: str, what: str) -> SecretRef | None:
    """A reference to a secret value, refusing the value itself pasted in its place."""
    if raw is None:
        return None
    if _looks_like_secret_value(raw):
        c.add(
            path,
            f"looks like {what} itself; give a reference (account.NAME, org.NAME "
            "or NAME) to a secret the delegate can read, never the value",
        )
        return None
    return _ref(c, raw, path)


def _ref(c: _Checker, raw: str | None, path: str) -> SecretRef | None:
    if raw is None:
        return None
    ref = parse_secret_ref(raw)
    if ref is None:
        c.add(
            path,
            f"{quoted(raw)} is not a secret reference: use account.NAME, org.NAME or NAME, where NAME has "
            "letters, digits, '_', '-', '.' and '$'",
        )
    return ref


def _oidc(c: _Checker, spec: Mapping[str, Any], region: str) -> tuple[str | None, str]:
    """``OidcAuthentication``'s spec: the role to exchange the token for, and (ours) the token's audience."""
    base = "connector.spec.credential.spec"
    c.unknown(spec, {"iamRoleArn", "audience"}, base)
    arn = c.string(spec.get("iamRoleArn"), f"{base}.iamRoleArn", required=True, max_len=2048)
    if arn is not None and not _role_in_partition(c, f"{base}.iamRoleArn", arn, region):
        arn = None
    audience = spec.get("audience")
    if audience is None:
        return arn, DEFAULT_OIDC_AUDIENCE
    if not isinstance(audience, str) or not _AUDIENCE_RE.fullmatch(audience):
        c.add(
            f"{base}.audience",
            "must be 1 to 255 printable characters without spaces: a client ID of the role's identity provider "
            f"(default {DEFAULT_OIDC_AUDIENCE})",
        )
        return arn, DEFAULT_OIDC_AUDIENCE
    return arn, audience


def _role_in_partition(c: _Checker, path: str, arn: str, region: str) -> bool:
    """Whether ``arn`` is an IAM role ARN in the test region's partition; a problem at ``path`` if not."""
    parsed = parse_role_arn(arn)
    if parsed is None:
        c.add(path, f"{quoted(arn)} is not an IAM role ARN (arn:PARTITION:iam::ACCOUNT:role/NAME)")
        return False
    region_part = partition_table().for_region(region)
    if region_part is not None and parsed[0] != region_part.name:
        role_part = partition_table().get(parsed[0])
        c.add(
            path,
            f"the role is in partition {parsed[0]} ({role_part.label if role_part else 'unknown'}) but "
            f"the test region {region} is in {region_part.name} ({region_part.label}); credentials "
            "never cross partitions: pick a test region in the role's partition",
        )
        return False
    return True


def _cross_account(c: _Checker, raw: Any, region: str) -> CrossAccountAccess | None:
    base = "connector.spec.credential.crossAccountAccess"
    xa = c.mapping(raw, base)
    if xa is None:
        return None
    c.unknown(xa, _XA_KEYS, base)
    arn = c.string(xa.get("crossAccountRoleArn"), f"{base}.crossAccountRoleArn", required=True, max_len=2048)
    ok = arn is not None and _role_in_partition(c, f"{base}.crossAccountRoleArn", arn, region)
    external_id = xa.get("externalId")
    if external_id == "":
        external_id = None
    if isinstance(external_id, str) and "<+" in external_id:
        c.add(f"{base}.externalId", expression_problem(f"{base}.externalId", external_id))
        ok = False
    elif external_id is not None and (not isinstance(external_id, str) or not EXTERNAL_ID_RE.match(external_id)):
        c.add(f"{base}.externalId", "must be 2 to 1224 characters of letters, digits and +=,.@:/-")
        ok = False
    duration = xa.get("durationSeconds")
    if duration is None:
        duration = DEFAULT_ASSUME_ROLE_SECONDS
    if isinstance(duration, bool) or not isinstance(duration, int) or not 900 <= duration <= 43200:
        c.add(f"{base}.durationSeconds", "must be a whole number of seconds from 900 to 43200")
        ok = False
    if not ok or arn is None:
        return None
    return CrossAccountAccess(role_arn=arn, external_id=external_id, duration_seconds=duration)


def _backoff(c: _Checker, raw: Any) -> BackoffStrategy | None:
    base = "connector.spec.awsSdkClientBackOffStrategyOverride"
    b = c.mapping(raw, base, required=False)
    if b is None:
        return None
    c.unknown(b, {"type", "spec"}, base)
    kind = b.get("type")
    kinds = ("FixedDelayBackoffStrategy", "EqualJitterBackoffStrategy", "FullJitterBackoffStrategy")
    if kind not in kinds:
        c.add(f"{base}.type", "must be one of " + ", ".join(kinds))
        return None
    s = c.mapping(b.get("spec"), f"{base}.spec")
    if s is None:
        return None
    names = (
        ("fixedBackoff", "retryCount")
        if kind == "FixedDelayBackoffStrategy"
        else ("baseDelay", "maxBackoffTime", "retryCount")
    )
    c.unknown(s, set(names), f"{base}.spec")
    values: dict[str, int] = {}
    for n in names:
        v = s.get(n)
        limit = 10 if n == "retryCount" else 60_000
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= limit:
            c.add(
                f"{base}.spec.{n}",
                f"is required: a whole number from 0 to {limit}" + (" (milliseconds)" if n != "retryCount" else ""),
            )
        else:
            values[n] = v
    if len(values) != len(names):
        return None
    if kind == "FixedDelayBackoffStrategy":
        return BackoffStrategy(kind, values["retryCount"], values["fixedBackoff"], values["fixedBackoff"])
    return BackoffStrategy(kind, values["retryCount"], values["baseDelay"], values["maxBackoffTime"])


def _permission_check(c: _Checker, raw: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    base = "connector.spec.permissionCheck"
    pc = c.mapping(raw, base, required=False)
    if pc is None:
        return (), ()
    c.unknown(pc, {"actions", "resources"}, base)
    actions = parse_actions(c, pc.get("actions"), f"{base}.actions", required=True)
    resources: list[str] = []
    raw_res = pc.get("resources")
    if raw_res is not None:
        if not isinstance(raw_res, list) or not all(isinstance(r, str) and r for r in raw_res):
            c.add(f"{base}.resources", "must be a list of resource ARNs (or '*')")
        else:
            resources = list(raw_res)
    return actions, tuple(resources)


def parse_actions(c: _Checker | None, raw: Any, path: str, *, required: bool = False) -> tuple[str, ...]:
    checker = c or _Checker()
    if raw is None:
        if required:
            checker.add(path, "is required: a list of IAM actions such as s3:GetObject")
        return ()
    if not isinstance(raw, list) or (not raw and required):
        checker.add(path, "must be a non-empty list of IAM actions such as s3:GetObject")
        return ()
    out: list[str] = []
    for i, a in enumerate(raw):
        if not isinstance(a, str) or not IAM_ACTION_RE.match(a):
            checker.add(
                f"{path}[{i}]", f"{quoted(a)} is not an IAM action (service:Action, e.g. ec2:DescribeInstances)"
            )
        else:
            out.append(a)
    if len(out) > 100:
        checker.add(path, "at most 100 actions can be checked at once")
    if c is None and checker.problems:
        raise checker.invalid()
    return tuple(dict.fromkeys(out))
