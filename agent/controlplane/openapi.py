"""The OpenAPI 3.1 document, generated from the route table and the shared wire models."""

from __future__ import annotations

from typing import Any

import msgspec

from agent._version import __version__
from agent.aws.connector import CREDENTIAL_TYPES
from agent.controlplane.routes import ROUTES, Route
from agent.protocol.models import ErrorBody
from agent.protocol.patterns import AccessKeyId, ConnectorIdentifier, ExternalId, IamAction, SecretRefText, Tag

_SECRET_REF = {
    **msgspec.json.schema(SecretRefText),
    "description": "A secret reference: account.NAME, org.NAME or NAME. The delegate reads the file NAME in its "
    "AGENT_SECRETS_DIR.",
    "examples": ["account.aws_secret_key"],
}
_TAGS = msgspec.json.schema(list[Tag])

#: The Harness AWS connector document as accepted by POST/PUT /api/v1/connectors (YAML or JSON).
#: The schema says what each field may hold; the server also applies Harness's cross-field rules
#: (Irsa and InheritFromDelegate need delegateSelectors and cannot run on the platform; a role ARN
#: must be in the test region's partition; accessKey xor accessKeyRef), each refusal naming its field.
CONNECTOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["connector"],
    "properties": {
        "connector": {
            "type": "object",
            "required": ["name", "type", "spec"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 128},
                "identifier": {
                    **msgspec.json.schema(ConnectorIdentifier),
                    "description": "Derived from the name when absent.",
                },
                "description": {"type": "string", "maxLength": 1024},
                "orgIdentifier": {"type": "string", "maxLength": 128},
                "projectIdentifier": {"type": "string", "maxLength": 128},
                "tags": {"type": "object", "additionalProperties": {"type": "string"}},
                "type": {"const": "Aws"},
                "spec": {
                    "type": "object",
                    "required": ["credential"],
                    "properties": {
                        "credential": {
                            "type": "object",
                            "required": ["type"],
                            "properties": {
                                "type": {"enum": list(CREDENTIAL_TYPES)},
                                "spec": {
                                    "type": ["object", "null"],
                                    "properties": {
                                        "accessKey": msgspec.json.schema(AccessKeyId),
                                        "accessKeyRef": _SECRET_REF,
                                        "secretKeyRef": _SECRET_REF,
                                        "delegateSelectors": _TAGS,
                                        "iamRoleArn": {
                                            "type": "string",
                                            "description": "OidcAuthentication: the role the control plane's "
                                            "OIDC token is exchanged for.",
                                        },
                                        "audience": {
                                            "type": "string",
                                            "maxLength": 255,
                                            "description": "OidcAuthentication: the token's aud "
                                            "(default sts.amazonaws.com).",
                                        },
                                    },
                                },
                                "crossAccountAccess": {
                                    "type": "object",
                                    "required": ["crossAccountRoleArn"],
                                    "properties": {
                                        "crossAccountRoleArn": {
                                            "type": "string",
                                            "pattern": "^arn:aws[a-z-]*:iam::[0-9]{12}:role/[\\w+=,.@/-]{1,512}$",
                                        },
                                        "externalId": msgspec.json.schema(ExternalId),
                                        "durationSeconds": {"type": "integer", "minimum": 900, "maximum": 43200},
                                    },
                                },
                                "region": {"type": "string", "description": "Test region; default us-east-1."},
                            },
                        },
                        "delegateSelectors": _TAGS,
                        "executeOnDelegate": {"type": "boolean", "default": True},
                        "awsSdkClientBackOffStrategyOverride": {
                            "type": "object",
                            "properties": {
                                "type": {
                                    "enum": [
                                        "FixedDelayBackoffStrategy",
                                        "EqualJitterBackoffStrategy",
                                        "FullJitterBackoffStrategy",
                                    ]
                                },
                                "spec": {"type": "object"},
                            },
                        },
                        "permissionCheck": {
                            "type": "object",
                            "properties": {
                                "actions": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": 100,
                                    "items": msgspec.json.schema(IamAction),
                                },
                                "resources": {"type": "array", "items": {"type": "string", "minLength": 1}},
                            },
                        },
                    },
                },
            },
        }
    },
}


_REVOKED = "The delegate token was revoked (code token_revoked)"
#: What a 403 means on each delegate route, beyond a revoked token.
_FORBIDDEN = {
    "register": f"{_REVOKED}; the token's scope does not allow the delegate's name or tags (code token_scope, "
    "naming them); or the instanceId is registered with another delegate token (code delegate_token_mismatch)",
    "renew": f"{_REVOKED}, or the lease's delegate is bound to another token (code delegate_token_mismatch)",
    "release": f"{_REVOKED}, or the lease's delegate is bound to another token (code delegate_token_mismatch)",
    "submit_result": f"{_REVOKED}, or the task is leased to a delegate bound to another token "
    "(code delegate_token_mismatch)",
    "*": f"{_REVOKED}, or the delegate was registered with another token (code delegate_token_mismatch)",
}


def _rate_limited(error: dict[str, Any]) -> dict[str, Any]:
    return {
        **error,
        "description": "Too many failed authentications from this client address (code rate_limited): "
        "wait Retry-After seconds",
        "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer", "minimum": 1}}},
    }


def _models(routes: tuple[Route, ...]) -> list[type[Any]]:
    found: list[type[Any]] = [ErrorBody]
    for r in routes:
        for t in [r.request, *(m for _, m in r.responses.values())]:
            if t is not None and t not in found:
                found.append(t)
    return found


def build_openapi(routes: tuple[Route, ...] = ROUTES) -> dict[str, Any]:
    models = _models(routes)
    schemas, components = msgspec.json.schema_components(models, ref_template="#/components/schemas/{name}")
    ref = dict(zip(models, schemas, strict=True))
    components = dict(components)
    components["ConnectorDocument"] = CONNECTOR_SCHEMA
    error = {"description": "", "content": {"application/json": {"schema": ref[ErrorBody]}}}

    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"operationId": r.handler, "summary": r.summary, "tags": [r.tag]}
        params = [
            {
                "name": p.name,
                "in": p.where,
                "required": p.required if p.where == "query" else True,
                "description": p.description,
                "schema": dict(p.schema),
            }
            for p in r.params
        ]
        if params:
            op["parameters"] = params
        if r.request is not None:
            op["requestBody"] = {
                "required": not r.request_optional,
                "content": {"application/json": {"schema": ref[r.request]}},
            }
        elif r.body_kind == "connector":
            schema = {"$ref": "#/components/schemas/ConnectorDocument"}
            op["requestBody"] = {
                "required": True,
                "content": {"application/yaml": {"schema": schema}, "application/json": {"schema": schema}},
            }
        responses: dict[str, Any] = {}
        for status, (desc, model) in sorted(r.responses.items()):
            entry: dict[str, Any] = {"description": desc}
            if model is not None:
                entry["content"] = {"application/json": {"schema": ref[model]}}
            elif r.handler == "healthz":
                entry["content"] = {
                    "application/json": {"schema": {"type": "object", "properties": {"status": {"const": "ok"}}}}
                }
            elif r.handler == "openapi":
                entry["content"] = {"application/json": {"schema": {"type": "object"}}}
            elif r.handler == "metrics":
                text = {"schema": {"type": "string"}}
                entry["content"] = {"text/plain": text, "application/openmetrics-text": text}
            responses[str(status)] = entry
        if r.request is not None or r.body_kind == "connector" or r.params:
            responses.setdefault("400", {**error, "description": "Invalid request: every problem is named"})
        if r.request is not None or r.body_kind == "connector":
            responses.setdefault("413", {**error, "description": "Body larger than 1 MiB"})
            responses.setdefault("415", {**error, "description": "Unsupported content type"})
        if r.auth != "none":
            responses.setdefault(
                "503",
                {
                    **error,
                    "description": "The database refuses writes (disk full); nothing changed: retry after Retry-After",
                },
            )
        if r.auth == "delegate":
            op["security"] = [{"delegateToken": []}]
            responses["401"] = {**error, "description": "Missing, invalid or expired request token"}
            responses["403"] = {**error, "description": _FORBIDDEN.get(r.handler, _FORBIDDEN["*"])}
            responses["429"] = _rate_limited(error)
        elif r.auth == "api":
            op["security"] = [{"apiKey": []}, {"bearerApiKey": []}]
            responses["401"] = {**error, "description": "Missing or wrong API key"}
            responses["429"] = _rate_limited(error)
        else:
            op["security"] = []
        op["responses"] = responses
        paths.setdefault(r.path, {})[r.method.lower()] = op

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "delegate-agent control plane",
            "version": __version__,
            "description": "Protocol v1 between delegates and the control plane (/v1), and the user API "
            "(/api/v1) for connectors, tasks and delegates. See docs/protocol.md.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "delegateToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "HS256 JWT minted per request from the delegate token (kid = "
                    "token fingerprint, aud = the server's audience, at most 1 h).",
                },
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearerApiKey": {"type": "http", "scheme": "bearer", "description": "The API key as a bearer token."},
            },
        },
    }
