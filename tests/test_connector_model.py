"""The Harness connector document: accepted forms, normalisation, and every problem named at once."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from agent.aws.connector import ConnectorInvalid, derive_identifier, parse_connector, parse_secret_ref
from tests.conftest import manual_connector


def problems(doc: Any) -> dict[str, str]:
    with pytest.raises(ConnectorInvalid) as err:
        parse_connector(doc)
    return {p.field: p.message for p in err.value.problems}


def test_a_harness_yaml_connector_parses() -> None:
    """The Harness YAML format is taken as it is exported."""
    doc = yaml.safe_load("""
connector:
  name: Prod account
  identifier: prod_account
  orgIdentifier: default
  projectIdentifier: platform
  description: our main account
  tags: {team: platform}
  type: Aws
  spec:
    credential:
      type: ManualConfig
      spec:
        accessKey: AKIAIOSFODNN7EXAMPLE
        secretKeyRef: account.aws_secret
      crossAccountAccess:
        crossAccountRoleArn: arn:aws:iam::210987654321:role/deploy
        externalId: ext-123
      region: eu-west-1
    delegateSelectors: [eks, prod]
    executeOnDelegate: true
    awsSdkClientBackOffStrategyOverride:
      type: EqualJitterBackoffStrategy
      spec: {baseDelay: 100, maxBackoffTime: 2000, retryCount: 3}
""")
    c = parse_connector(doc)
    assert (c.identifier, c.name, c.credential_type, c.region, c.partition) == (
        "prod_account",
        "Prod account",
        "ManualConfig",
        "eu-west-1",
        "aws",
    )
    assert c.secret_key_ref is not None and (c.secret_key_ref.scope, c.secret_key_ref.name) == ("account", "aws_secret")
    assert c.cross_account is not None and c.cross_account.external_id == "ext-123"
    assert c.delegate_selectors == ("eks", "prod")
    assert c.backoff is not None and (c.backoff.retry_count, c.backoff.base_delay_ms) == (3, 100)
    assert parse_connector(c.to_document()) == c  # the normalised form round-trips


def test_the_identifier_is_derived_from_the_name() -> None:
    """As in Harness: invalid characters become underscores, and a leading digit gets one too."""
    assert derive_identifier("Prod account-1.eu") == "Prod_account_1_eu"
    assert derive_identifier("1st account") == "_1st_account"
    assert parse_connector(manual_connector("My AWS")).identifier == "My_AWS"


def test_defaults_match_harness() -> None:
    """Test region us-east-1; executeOnDelegate true."""
    c = parse_connector(
        manual_connector(
            credential={"type": "ManualConfig", "spec": {"accessKey": "AKIAIOSFODNN7EXAMPLE", "secretKeyRef": "s"}}
        )
    )
    assert (c.region, c.region_explicit, c.execute_on_delegate) == ("us-east-1", False, True)


def test_every_problem_is_reported_at_once() -> None:
    """A user fixes a connector in one round: all problems, each with its field."""
    found = problems(
        {
            "connector": {
                "name": "",
                "type": "aws",
                "colour": "red",
                "spec": {
                    "credential": {
                        "type": "ManualConfig",
                        "spec": {"accessKey": "lowercase-key"},
                        "region": "us-est-1",
                        "crossAccountAccess": {"crossAccountRoleArn": "not-an-arn", "externalId": "x"},
                    },
                    "delegateSelectors": ["has space"],
                    "executeOnDelegate": "yes",
                },
            }
        }
    )
    assert found == {
        "connector.name": "is required",
        "connector.type": "'aws' is not supported: this delegate validates Aws connectors (did you mean Aws?)",
        "connector.colour": "unknown field",
        "connector.spec.credential.region": "unknown region 'us-est-1' (did you mean us-east-1 or us-west-1?)",
        "connector.spec.credential.spec.accessKey": found["connector.spec.credential.spec.accessKey"],
        "connector.spec.credential.spec.secretKeyRef": found["connector.spec.credential.spec.secretKeyRef"],
        "connector.spec.credential.crossAccountAccess.crossAccountRoleArn": found[
            "connector.spec.credential.crossAccountAccess.crossAccountRoleArn"
        ],
        "connector.spec.credential.crossAccountAccess.externalId": found[
            "connector.spec.credential.crossAccountAccess.externalId"
        ],
        "connector.spec.delegateSelectors[0]": (
            "a tag has letters, digits and _.:/=+@- (starting with a letter or digit)"
        ),
        "connector.spec.executeOnDelegate": "must be true or false, not a string",
    }
    assert "access key ID" in found["connector.spec.credential.spec.accessKey"]
    assert "is required" in found["connector.spec.credential.spec.secretKeyRef"]
    assert "not an IAM role ARN" in found["connector.spec.credential.crossAccountAccess.crossAccountRoleArn"]


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"credential": {"type": "Irsa"}}, "connector.spec.delegateSelectors", "Delegate Selector cannot be null"),
        (
            {"credential": {"type": "InheritFromDelegate"}, "delegateSelectors": ["eks"], "executeOnDelegate": False},
            "connector.spec.executeOnDelegate",
            "does not support validation through harness",
        ),
        ({"credential": {"type": "OidcAuthentication"}}, "connector.spec.credential.spec", "iamRoleArn"),
        (
            {
                "credential": {
                    "type": "ManualConfig",
                    "spec": {
                        "accessKey": "AKIAIOSFODNN7EXAMPLE",
                        "secretKeyRef": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                    },
                }
            },
            "connector.spec.credential.spec.secretKeyRef",
            "looks like a secret key itself",
        ),
        (
            {
                "credential": {
                    "type": "ManualConfig",
                    "spec": {"accessKey": "AKIAIOSFODNN7EXAMPLE", "secretKeyRef": "../etc/passwd"},
                }
            },
            "connector.spec.credential.spec.secretKeyRef",
            "not a secret reference",
        ),
        (
            {
                "credential": {
                    "type": "ManualConfig",
                    "spec": {"accessKey": "AKIAIOSFODNN7EXAMPLE", "accessKeyRef": "ak", "secretKeyRef": "sk"},
                }
            },
            "connector.spec.credential.spec.accessKey",
            "not both",
        ),
        (
            {
                "credential": {
                    "type": "Irsa",
                    "region": "us-gov-west-1",
                    "crossAccountAccess": {"crossAccountRoleArn": "arn:aws:iam::123456789012:role/x"},
                },
                "delegateSelectors": ["eks"],
            },
            "connector.spec.credential.crossAccountAccess.crossAccountRoleArn",
            "never cross partitions",
        ),
        (
            {
                "credential": {
                    "type": "Irsa",
                    "crossAccountAccess": {
                        "crossAccountRoleArn": "arn:aws:iam::123456789012:role/x",
                        "durationSeconds": 60,
                    },
                },
                "delegateSelectors": ["eks"],
            },
            "connector.spec.credential.crossAccountAccess.durationSeconds",
            "900",
        ),
        (
            {"credential": {"type": "Irsa"}, "delegateSelectors": ["eks"], "permissionCheck": {"actions": ["s3"]}},
            "connector.spec.permissionCheck.actions[0]",
            "not an IAM action",
        ),
        (
            {
                "credential": {"type": "Irsa"},
                "delegateSelectors": ["eks"],
                "awsSdkClientBackOffStrategyOverride": {
                    "type": "FixedDelayBackoffStrategy",
                    "spec": {"fixedBackoff": -1, "retryCount": 3},
                },
            },
            "connector.spec.awsSdkClientBackOffStrategyOverride.spec.fixedBackoff",
            "whole number",
        ),
        (
            {"credential": {"type": "Irsa", "spec": {"roleArn": "x"}}, "delegateSelectors": ["eks"]},
            "connector.spec.credential.spec.roleArn",
            "takes no fields",
        ),
        ({"credentials": {}}, "connector.spec.credentials", "did you mean credential?"),
    ],
    ids=[
        "irsa-no-selectors",
        "inherit-on-platform",
        "oidc",
        "secret-pasted",
        "path-traversal",
        "both-keys",
        "partition-mismatch",
        "short-duration",
        "bad-action",
        "bad-backoff",
        "irsa-fields",
        "typo",
    ],
)
def test_specific_problems_name_their_field(spec: dict[str, Any], field: str, words: str) -> None:
    """Each rule points at the field to fix and says what is wrong with it."""
    found = problems({"connector": {"name": "x", "type": "Aws", "spec": spec}})
    assert field in found, found
    assert words in found[field]


def test_govcloud_and_china_regions_are_known() -> None:
    """Partitions come from botocore's data: GovCloud and China test regions are accepted."""
    gov = parse_connector(
        {
            "connector": {
                "name": "gov",
                "type": "Aws",
                "spec": {
                    "delegateSelectors": ["gov"],
                    "credential": {
                        "type": "Irsa",
                        "region": "us-gov-west-1",
                        "crossAccountAccess": {"crossAccountRoleArn": "arn:aws-us-gov:iam::123456789012:role/deploy"},
                    },
                },
            }
        }
    )
    assert gov.partition == "aws-us-gov"
    cn = parse_connector(
        {
            "connector": {
                "name": "cn",
                "type": "Aws",
                "spec": {
                    "delegateSelectors": ["cn"],
                    "credential": {"type": "InheritFromDelegate", "region": "cn-north-1"},
                },
            }
        }
    )
    assert cn.partition == "aws-cn"


@pytest.mark.parametrize(
    ("ref", "scope", "name"),
    [("account.aws_sk", "account", "aws_sk"), ("org.k-1", "org", "k-1"), ("plain.name", "project", "plain.name")],
)
def test_secret_references(ref: str, scope: str, name: str) -> None:
    """account.NAME, org.NAME and NAME all point at the file NAME in the delegate's secrets dir."""
    parsed = parse_secret_ref(ref)
    assert parsed is not None and (parsed.scope, parsed.name) == (scope, name)


@pytest.mark.parametrize("bad", [None, [], "text", {"connector": None}, {"connector": []}, {"other": {}}])
def test_nonsense_documents_are_rejected_with_a_problem(bad: Any) -> None:
    """Whatever arrives, the answer is a list of problems, never a crash."""
    assert problems(bad)


def test_a_harness_list_answer_is_named_as_such() -> None:
    """The API's list of connectors (data.content[]) is not one connector: the problem says so."""
    listing = {"status": "SUCCESS", "data": {"content": [{"connector": {}}], "pageIndex": 0}, "correlationId": "c"}
    assert problems(listing) == {
        "data.content": "is Harness's list of connectors: apply each entry of data.content on its own"
    }
