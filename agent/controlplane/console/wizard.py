"""The New Connector wizard's model: form fields in, a Harness connector document out, and back.

The wizard has the seed's steps (Overview, Credentials, Connectivity mode, Connection test,
Finish). The first three are forms; this module turns what they hold into the connector
document, checks it with :func:`agent.aws.connector.parse_connector` (the parser the API uses, so
a field's error is the API's message, word for word) and says which form field each problem
belongs to, so the page shows it beside that field.

State between steps travels in the page as hidden fields (:meth:`WizardForm.hidden`): the wizard
is stateless on the server, works without JavaScript, survives a restart or another replica
answering the next step, and the back button or two tabs cannot mix up drafts. That is safe
because no field holds a secret: the secret key and session token are *references* to secrets the
delegate reads, and a value that looks like a secret itself is refused by the parser and wiped
from the form (:meth:`WizardCheck.form`) before anything is rendered, so it never comes back.

Editing reads a stored document into the form (:meth:`WizardForm.from_document`); what the wizard
does not show (a permission check, back-off, test interval, org/project...) is kept from that
document when the form is turned back into one, so an edit through the wizard changes only what
the wizard shows.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import yaml

from agent._values import quoted
from agent.aws.connector import (
    CREDENTIAL_TYPES,
    DEFAULT_REGION,
    AwsConnector,
    ConnectorInvalid,
    derive_identifier,
    parse_connector,
)
from agent.aws.partitions import partition_table
from agent.protocol.models import Problem

__all__ = [
    "CONNECTIVITY_MODES",
    "FIELD_LABELS",
    "FORM_STEPS",
    "STEPS",
    "CredentialChoice",
    "RegionGroup",
    "WizardCheck",
    "WizardForm",
    "WizardStep",
    "check",
    "credential_choices",
    "field_for_problem",
    "region_groups",
    "step_of",
    "to_yaml",
]

WizardStep = Literal["overview", "credentials", "connectivity", "test", "finish"]
#: The seed's steps, in order, with their titles.
STEPS: Final[tuple[tuple[WizardStep, str], ...]] = (
    ("overview", "Overview"),
    ("credentials", "Credentials"),
    ("connectivity", "Connectivity mode"),
    ("test", "Connection test"),
    ("finish", "Finish"),
)
#: The steps that are forms (the rest show what the control plane did).
FORM_STEPS: Final[tuple[WizardStep, ...]] = ("overview", "credentials", "connectivity")

ConnectivityMode = Literal["platform", "any", "tags"]
#: How a connector is tested: (value, label).
CONNECTIVITY_MODES: Final[tuple[tuple[ConnectivityMode, str], ...]] = (
    ("platform", "Connect through the platform"),
    ("any", "Connect through any delegate"),
    ("tags", "Connect only through delegates with all of these tags"),
)

#: Which step shows each form field (and so which step a problem of that field blocks).
_FIELD_STEP: Final[dict[str, WizardStep]] = {
    "name": "overview",
    "identifier": "overview",
    "description": "overview",
    "tags": "overview",
    "credential_type": "credentials",
    "access_key_kind": "credentials",
    "access_key": "credentials",
    "secret_key_ref": "credentials",
    "session_token_ref": "credentials",
    "oidc_role_arn": "credentials",
    "oidc_audience": "credentials",
    "cross_account": "credentials",
    "cross_account_role_arn": "credentials",
    "external_id": "credentials",
    "region": "credentials",
    "connectivity": "connectivity",
    "selectors": "connectivity",
    # Problems no field of the form can fix (a kept field of an edited connector): shown above the
    # last form step, which is where they would otherwise block saving.
    "form": "connectivity",
}

#: What each form field is called on the page (the error summary links to it by this name).
FIELD_LABELS: Final[dict[str, str]] = {
    "name": "Name",
    "identifier": "Identifier",
    "description": "Description",
    "tags": "Tags",
    "credential_type": "Credentials",
    "access_key_kind": "Access key kind",
    "access_key": "Access key",
    "secret_key_ref": "Secret key reference",
    "session_token_ref": "Session token reference",
    "oidc_role_arn": "IAM role ARN",
    "oidc_audience": "Audience",
    "cross_account": "Cross-account access",
    "cross_account_role_arn": "Cross-account role ARN",
    "external_id": "External ID",
    "region": "Test region",
    "connectivity": "Connectivity mode",
    "selectors": "Delegate tags",
    "form": "Other fields",
}

#: A problem's field path (its prefix, longest first) -> the form field it is shown beside.
_PATH_FIELD: Final[tuple[tuple[str, str], ...]] = (
    ("connector.spec.credential.crossAccountAccess.crossAccountRoleArn", "cross_account_role_arn"),
    ("connector.spec.credential.crossAccountAccess.externalId", "external_id"),
    ("connector.spec.credential.crossAccountAccess", "cross_account_role_arn"),
    ("connector.spec.credential.spec.accessKeyRef", "access_key"),
    ("connector.spec.credential.spec.accessKey", "access_key"),
    ("connector.spec.credential.spec.secretKeyRef", "secret_key_ref"),
    ("connector.spec.credential.spec.sessionTokenRef", "session_token_ref"),
    ("connector.spec.credential.spec.iamRoleArn", "oidc_role_arn"),
    ("connector.spec.credential.spec.audience", "oidc_audience"),
    ("connector.spec.credential.spec", "credential_type"),
    ("connector.spec.credential.region", "region"),
    ("connector.spec.credential.type", "credential_type"),
    ("connector.spec.credential", "credential_type"),
    ("connector.spec.delegateSelectors", "selectors"),
    ("connector.spec.executeOnDelegate", "connectivity"),
    ("connector.identifier", "identifier"),
    ("connector.name", "name"),
    ("connector.description", "description"),
    ("connector.tags", "tags"),
)

#: Form fields whose value is wiped when the parser refuses it: a secret value pasted where a
#: reference belongs, or a secret key pasted as the access key ID, must never be sent back.
_NEVER_ECHO: Final[frozenset[str]] = frozenset({"access_key", "secret_key_ref", "session_token_ref"})


def field_for_problem(path: str) -> str:
    """The form field a parser problem belongs to (``form`` when none of the wizard's fields)."""
    for prefix, name in _PATH_FIELD:
        if path == prefix or path.startswith((prefix + ".", prefix + "[")):
            return name
    return "form"


def step_of(field_name: str) -> WizardStep:
    return _FIELD_STEP.get(field_name, "connectivity")


def _step_index(step: WizardStep) -> int:
    return [s for s, _ in STEPS].index(step)


@dataclass(frozen=True)
class CredentialChoice:
    value: str
    label: str


def credential_choices() -> tuple[CredentialChoice, ...]:
    """The credential types the parser accepts, with the seed's labels.

    OIDC appears once the parser accepts ``OidcAuthentication``: the wizard never offers what the
    API would refuse.
    """
    labels = {
        "ManualConfig": "AWS Access Key",
        "InheritFromDelegate": "Assume IAM Role on Delegate",
        "Irsa": "Use IRSA",
        "OidcAuthentication": "Use OIDC",
    }
    order = ("ManualConfig", "InheritFromDelegate", "Irsa", "OidcAuthentication")
    accepted: tuple[str, ...] = CREDENTIAL_TYPES
    return tuple(CredentialChoice(t, labels[t]) for t in order if t in accepted)


@dataclass(frozen=True)
class RegionGroup:
    """One ``<optgroup>`` of the test-region select: a partition and its regions."""

    partition: str
    label: str
    regions: tuple[str, ...]


def region_groups() -> tuple[RegionGroup, ...]:
    """Every region botocore knows, by partition: commercial first, then GovCloud, China, the rest."""
    first = {"aws": 0, "aws-us-gov": 1, "aws-cn": 2}
    parts = sorted(partition_table().partitions, key=lambda p: (first.get(p.name, 3), p.name))
    return tuple(RegionGroup(p.name, f"{p.label} ({p.name})", tuple(sorted(p.regions))) for p in parts)


_TAG_SPLIT = re.compile(r"[,\n]")
_SELECTOR_SPLIT = re.compile(r"[\s,]+")


@dataclass(frozen=True)
class WizardForm:
    """Every field of the wizard's forms, as the browser sends them (strings)."""

    name: str = ""
    identifier: str = ""
    description: str = ""
    #: ``key:value`` pairs, separated by commas or new lines (a key alone has an empty value).
    tags: str = ""
    credential_type: str = "ManualConfig"
    #: ``text``: the access key ID written in the connector; ``secret``: a reference to a secret holding it.
    access_key_kind: str = "text"
    access_key: str = ""
    secret_key_ref: str = ""
    session_token_ref: str = ""
    oidc_role_arn: str = ""
    oidc_audience: str = ""
    #: ``on`` when cross-account access (assume a role in another account) is enabled.
    cross_account: str = ""
    cross_account_role_arn: str = ""
    external_id: str = ""
    region: str = DEFAULT_REGION
    connectivity: str = "any"
    #: Delegate tags, separated by commas or spaces.
    selectors: str = ""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_form(cls, data: Mapping[str, Any]) -> WizardForm:
        """The form from posted fields; unknown fields are ignored, every value is a stripped string
        of bounded length (a form is not where megabytes arrive)."""
        values: dict[str, str] = {}
        for name in cls.field_names():
            raw = data.get(name)
            if isinstance(raw, str):
                values[name] = raw.strip()[:4096]
        return cls(**values)

    @classmethod
    def from_document(cls, document: Any) -> WizardForm:
        """The form for editing a stored connector (a document the parser accepts)."""
        conn = parse_connector(document)
        body = document["connector"] if isinstance(document, Mapping) and "connector" in document else {}
        cred = body.get("spec", {}).get("credential", {}) if isinstance(body, Mapping) else {}
        cred_spec = cred.get("spec") if isinstance(cred, Mapping) else None
        oidc = cred_spec if isinstance(cred_spec, Mapping) and cred.get("type") == "OidcAuthentication" else {}
        if conn.execute_on_delegate is False:
            mode: ConnectivityMode = "platform"
        elif conn.delegate_selectors:
            mode = "tags"
        else:
            mode = "any"
        xa = conn.cross_account
        return cls(
            name=conn.name,
            identifier=conn.identifier,
            description=conn.description or "",
            tags=", ".join(f"{k}:{v}" if v else k for k, v in conn.tags),
            credential_type=conn.credential_type,
            access_key_kind="secret" if conn.access_key_ref is not None else "text",
            access_key=conn.access_key_ref.raw if conn.access_key_ref is not None else conn.access_key or "",
            secret_key_ref=conn.secret_key_ref.raw if conn.secret_key_ref else "",
            session_token_ref=conn.session_token_ref.raw if conn.session_token_ref else "",
            oidc_role_arn=str(oidc.get("iamRoleArn") or ""),
            oidc_audience=str(oidc.get("audience") or ""),
            cross_account="on" if xa is not None else "",
            cross_account_role_arn=xa.role_arn if xa else "",
            external_id=(xa.external_id or "") if xa else "",
            region=conn.region,
            connectivity=mode,
            selectors=", ".join(conn.delegate_selectors),
        )

    def with_values(self, **values: str) -> WizardForm:
        return dataclasses.replace(self, **values)

    def hidden(self, *, except_step: WizardStep | None = None) -> list[tuple[str, str]]:
        """(name, value) of every field not shown on ``except_step``: the state the page carries."""
        return [
            (name, getattr(self, name))
            for name in self.field_names()
            if except_step is None or step_of(name) != except_step
        ]

    @property
    def effective_identifier(self) -> str:
        """The identifier as written, or the one Harness derives from the name."""
        return self.identifier or (derive_identifier(self.name) if self.name else "")

    def tag_pairs(self) -> tuple[dict[str, str], list[str]]:
        """The tags as a mapping, and the form's own problems with them."""
        tags: dict[str, str] = {}
        problems = []
        for raw in _TAG_SPLIT.split(self.tags):
            item = raw.strip()
            if not item:
                continue
            key, _, value = item.partition(":")
            key, value = key.strip(), value.strip()
            if not key:
                problems.append(f"{item!r} has no key: write each tag as key:value, e.g. env:prod")
                continue
            tags[key] = value
        return tags, problems

    def selector_list(self) -> list[str]:
        return [s for s in _SELECTOR_SPLIT.split(self.selectors) if s]

    def to_document(self, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The Harness connector document of this form.

        ``base``: the stored document being edited; what the wizard does not show is kept from it.
        """
        tags, _ = self.tag_pairs()
        ctype = self.credential_type
        cred_spec: dict[str, Any] | None = None
        if ctype == "ManualConfig":
            cred_spec = {}
            if self.access_key:
                cred_spec["accessKeyRef" if self.access_key_kind == "secret" else "accessKey"] = self.access_key
            if self.secret_key_ref:
                cred_spec["secretKeyRef"] = self.secret_key_ref
            if self.session_token_ref:
                cred_spec["sessionTokenRef"] = self.session_token_ref
        elif ctype == "OidcAuthentication":
            cred_spec = {}
            if self.oidc_role_arn:
                cred_spec["iamRoleArn"] = self.oidc_role_arn
            if self.oidc_audience:
                cred_spec["audience"] = self.oidc_audience
        credential: dict[str, Any] = {"type": ctype, "spec": cred_spec}
        base_conn = _mapping(base, "connector")
        base_cred = _mapping(_mapping(base_conn, "spec"), "credential")
        if self.cross_account == "on":
            xa: dict[str, Any] = {"crossAccountRoleArn": self.cross_account_role_arn}
            if self.external_id:
                xa["externalId"] = self.external_id
            base_xa = _mapping(base_cred, "crossAccountAccess")
            if "durationSeconds" in base_xa:
                xa["durationSeconds"] = base_xa["durationSeconds"]
            credential["crossAccountAccess"] = xa
        # The region is written, as Harness's wizard does, except when editing a connector that left
        # it to the default and still does (an edit changes only what the user changed).
        if self.region != DEFAULT_REGION or base is None or "region" in base_cred:
            credential["region"] = self.region
        mode = self.connectivity
        selectors = self.selector_list() if mode in ("tags", "platform") else []
        spec: dict[str, Any] = {
            "credential": credential,
            "delegateSelectors": selectors,
            "executeOnDelegate": mode != "platform",
        }
        for key, value in _mapping(base_conn, "spec").items():
            if key not in spec:
                spec[key] = copy.deepcopy(value)
        body: dict[str, Any] = {"name": self.name, "identifier": self.effective_identifier}
        for key, value in base_conn.items():
            if key not in ("name", "identifier", "description", "tags", "type", "spec"):
                body[key] = copy.deepcopy(value)
        if self.description:
            body["description"] = self.description
        body["tags"] = tags
        body["type"] = "Aws"
        body["spec"] = spec
        return {"connector": _ordered(body)}


#: The order Harness writes a connector's keys in (and ``AwsConnector.to_document`` does).
_BODY_ORDER = (
    "name",
    "identifier",
    "description",
    "orgIdentifier",
    "projectIdentifier",
    "accountIdentifier",
    "tags",
    "testInterval",
    "type",
    "spec",
)


def _ordered(body: dict[str, Any]) -> dict[str, Any]:
    rank = {k: i for i, k in enumerate(_BODY_ORDER)}
    return dict(sorted(body.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    inner = value.get(key) if isinstance(value, Mapping) else None
    return inner if isinstance(inner, Mapping) else {}


@dataclass(frozen=True)
class WizardCheck:
    """What checking the form up to a step found."""

    #: The form as it may be rendered again: refused secret-looking values wiped.
    form: WizardForm
    document: dict[str, Any]
    #: Form field -> the API's messages for it, for fields of the checked steps only.
    errors: dict[str, list[str]] = field(default_factory=dict)
    #: The parsed connector, when the whole document is valid.
    connector: AwsConnector | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def first_step_with_errors(self) -> WizardStep | None:
        steps = sorted(_step_index(step_of(f)) for f in self.errors)
        return STEPS[steps[0]][0] if steps else None


def check(form: WizardForm, upto: WizardStep, base: Mapping[str, Any] | None = None) -> WizardCheck:
    """Check the form's document with the API's parser, keeping the problems of steps up to ``upto``.

    A later step's problems (a secret key not yet given while on Overview) do not block an earlier
    one; ``upto="connectivity"`` checks everything. Each message is the parser's own.
    """
    document = form.to_document(base)
    problems: list[Problem] = []
    connector: AwsConnector | None = None
    try:
        connector = parse_connector(document)
    except ConnectorInvalid as exc:
        problems = list(exc.problems)
    _, tag_problems = form.tag_pairs()
    problems += [Problem(field="connector.tags", message=m) for m in tag_problems]
    if form.connectivity not in {m for m, _ in CONNECTIVITY_MODES}:
        problems.append(Problem(field="connector.spec.executeOnDelegate", message="choose how the connector is tested"))
    limit = _step_index(upto)
    errors: dict[str, list[str]] = {}
    wipe: dict[str, str] = {}
    for p in problems:
        name = field_for_problem(p.field)
        message = p.message if name != "form" else f"{p.field}: {p.message}"
        if name in _NEVER_ECHO:
            wipe[name] = ""  # refused: never rendered again, even when the problem is a later step's
            # nor quoted in the parser's message ("'wJalr...' is not a secret reference")
            if value := getattr(form, name):
                message = message.replace(quoted(value), "the value given")
        if _step_index(step_of(name)) > limit:
            continue
        messages = errors.setdefault(name, [])
        if message not in messages:
            messages.append(message)
    clean = form.with_values(**wipe) if wipe else form
    return WizardCheck(
        form=clean,
        document=clean.to_document(base) if wipe else document,
        errors=errors,
        connector=connector if not problems else None,
    )


def to_yaml(document: Mapping[str, Any]) -> str:
    """The Harness YAML of a document ("View YAML"), keys in the order written."""
    return str(yaml.safe_dump(dict(document), sort_keys=False, default_flow_style=False, allow_unicode=True))


def steps_done(upto: WizardStep) -> Iterable[WizardStep]:
    """The steps before ``upto`` (the indicator marks them done)."""
    return [s for s, _ in STEPS][: _step_index(upto)]
