"""The New Connector wizard's model: form fields to the Harness document and back, checked by the API's parser."""

from __future__ import annotations

from typing import Any

import pytest

from agent import _yaml
from agent.aws.connector import CREDENTIAL_TYPES, ConnectorInvalid, parse_connector
from agent.controlplane.console import wizard
from agent.controlplane.console.wizard import WizardForm, check

SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def manual_form(**values: str) -> WizardForm:
    base = {
        "name": "Prod account",
        "credential_type": "ManualConfig",
        "access_key": "AKIAIOSFODNN7EXAMPLE",
        "secret_key_ref": "account.aws_secret",
        "connectivity": "any",
    }
    return WizardForm.from_form({**base, **values})


def api_problems(document: Any) -> dict[str, str]:
    """What the API's parser says about a document, by field path."""
    try:
        parse_connector(document)
    except ConnectorInvalid as exc:
        return {p.field: p.message for p in exc.problems}
    return {}


def test_a_manual_connector_becomes_the_harness_document() -> None:
    form = manual_form(tags="env:prod, team: platform", description="The prod account", region="eu-west-1")
    result = check(form, "connectivity")
    assert result.ok, result.errors
    assert result.document == {
        "connector": {
            "name": "Prod account",
            "identifier": "Prod_account",
            "description": "The prod account",
            "tags": {"env": "prod", "team": "platform"},
            "type": "Aws",
            "spec": {
                "credential": {
                    "type": "ManualConfig",
                    "spec": {"accessKey": "AKIAIOSFODNN7EXAMPLE", "secretKeyRef": "account.aws_secret"},
                    "region": "eu-west-1",
                },
                "delegateSelectors": [],
                "executeOnDelegate": True,
            },
        }
    }
    assert result.connector is not None and result.connector.region == "eu-west-1"


def test_the_identifier_is_derived_from_the_name_unless_written() -> None:
    assert manual_form(name="My prod-account 1").effective_identifier == "My_prod_account_1"
    assert manual_form(name="9 lives").effective_identifier == "_9_lives"
    written = manual_form(name="My prod", identifier="prod")
    assert check(written, "connectivity").document["connector"]["identifier"] == "prod"


def test_each_problem_shows_beside_its_field_with_the_api_message() -> None:
    form = manual_form(
        identifier="9bad",
        access_key="AKIA",
        cross_account="on",
        cross_account_role_arn="arn:aws:iam::123:role/x",
        external_id="x",
        connectivity="tags",
        selectors="ok, -bad",
    )
    result = check(form, "connectivity")
    said = api_problems(form.to_document())
    assert result.errors["identifier"] == [said["connector.identifier"]]
    assert result.errors["access_key"] == [said["connector.spec.credential.spec.accessKey"]]
    assert result.errors["cross_account_role_arn"] == [
        said["connector.spec.credential.crossAccountAccess.crossAccountRoleArn"]
    ]
    assert result.errors["external_id"] == [said["connector.spec.credential.crossAccountAccess.externalId"]]
    assert result.errors["selectors"] == [said["connector.spec.delegateSelectors[1]"]]
    assert "is not an IAM role ARN" in result.errors["cross_account_role_arn"][0]


def test_a_later_steps_problems_do_not_block_an_earlier_step() -> None:
    form = WizardForm.from_form({"name": "Prod"})  # nothing of the credentials yet
    overview = check(form, "overview")
    assert overview.ok, overview.errors
    credentials = check(form, "credentials")
    assert "secret_key_ref" in credentials.errors
    assert credentials.first_step_with_errors == "credentials"
    assert check(form.with_values(name=""), "connectivity").first_step_with_errors == "overview"
    assert check(WizardForm.from_form({"name": ""}), "overview").errors["name"] == ["is required"]


def test_inherit_from_delegate_needs_tags_and_a_delegate() -> None:
    form = WizardForm.from_form({"name": "x", "credential_type": "InheritFromDelegate", "connectivity": "any"})
    assert check(form, "credentials").ok
    errors = check(form, "connectivity").errors
    assert errors["selectors"][0].startswith("Delegate Selector cannot be null")
    platform = check(form.with_values(connectivity="platform", selectors="eks"), "connectivity").errors
    assert "does not support validation through harness" in platform["connectivity"][0]
    ok = check(form.with_values(connectivity="tags", selectors="eks prod"), "connectivity")
    assert ok.ok and ok.document["connector"]["spec"]["delegateSelectors"] == ["eks", "prod"]
    assert ok.document["connector"]["spec"]["credential"] == {
        "type": "InheritFromDelegate",
        "spec": None,
        "region": "us-east-1",
    }


def test_through_the_platform_is_execute_on_delegate_false() -> None:
    result = check(manual_form(connectivity="platform"), "connectivity")
    assert result.ok and result.document["connector"]["spec"]["executeOnDelegate"] is False


def test_a_secret_value_in_a_reference_field_is_refused_and_never_echoed() -> None:
    form = manual_form(secret_key_ref=SECRET_KEY, session_token_ref="FwoGZXIvYXdzEBYaDHhB3sdf9834hfsdkJHSDF8sd7f")
    said = api_problems(form.to_document())
    result = check(form, "credentials")
    assert result.errors["secret_key_ref"] == [said["connector.spec.credential.spec.secretKeyRef"]]
    assert "looks like a secret key itself" in result.errors["secret_key_ref"][0]
    assert "looks like a session token itself" in result.errors["session_token_ref"][0]
    assert result.form.secret_key_ref == "" and result.form.session_token_ref == ""
    rendered = repr(result.form.hidden()) + wizard.to_yaml(result.document) + repr(result.errors)
    assert SECRET_KEY not in rendered and "FwoGZXIvYXdzEBYaDHhB3sdf9834" not in rendered
    # Wiped even while checking an earlier step, whose page carries the field hidden.
    assert check(form, "overview").form.secret_key_ref == ""


def test_a_rejected_access_key_is_not_echoed() -> None:
    result = check(manual_form(access_key=SECRET_KEY), "credentials")
    assert "does not look like an AWS access key ID" in result.errors["access_key"][0]
    assert result.form.access_key == ""


def test_the_access_key_may_be_a_secret_reference() -> None:
    result = check(manual_form(access_key_kind="secret", access_key="account.aws_key_id"), "connectivity")
    assert result.ok
    assert result.document["connector"]["spec"]["credential"]["spec"] == {
        "accessKeyRef": "account.aws_key_id",
        "secretKeyRef": "account.aws_secret",
    }


def test_cross_account_and_the_partition_of_the_test_region() -> None:
    form = manual_form(
        cross_account="on",
        cross_account_role_arn="arn:aws-us-gov:iam::123456789012:role/deploy",
        external_id="ext-1",
        region="us-gov-west-1",
    )
    result = check(form, "connectivity")
    assert result.ok
    assert result.document["connector"]["spec"]["credential"]["crossAccountAccess"] == {
        "crossAccountRoleArn": "arn:aws-us-gov:iam::123456789012:role/deploy",
        "externalId": "ext-1",
    }
    wrong = check(form.with_values(region="us-east-1"), "connectivity")
    assert "credentials never cross partitions" in wrong.errors["cross_account_role_arn"][0]
    off = check(form.with_values(cross_account=""), "connectivity")
    assert "crossAccountAccess" not in off.document["connector"]["spec"]["credential"]


def test_an_unknown_region_gets_the_parsers_suggestion() -> None:
    form = manual_form(region="us-est-1")  # a tampered select: the page offers only known regions
    errors = check(form, "credentials").errors
    assert errors["region"] == [api_problems(form.to_document())["connector.spec.credential.region"]]
    assert errors["region"][0].startswith("unknown region 'us-est-1' (did you mean us-east-1")


def test_tags_without_a_key_are_a_problem_of_the_tags_field() -> None:
    errors = check(manual_form(tags="env:prod, :orphan"), "overview").errors
    assert "has no key" in errors["tags"][0]


DOCUMENTS = [
    parse_connector(
        {
            "connector": {
                "name": "Prod",
                "identifier": "prod",
                "description": "d",
                "tags": {"env": "prod", "solo": ""},
                "type": "Aws",
                "spec": {
                    "credential": {
                        "type": "ManualConfig",
                        "spec": {
                            "accessKeyRef": "account.key_id",
                            "secretKeyRef": "org.secret",
                            "sessionTokenRef": "token",
                        },
                        "crossAccountAccess": {
                            "crossAccountRoleArn": "arn:aws:iam::123456789012:role/x",
                            "externalId": "abc",
                            "durationSeconds": 1800,
                        },
                        "region": "eu-central-1",
                    },
                    "delegateSelectors": ["eks"],
                    "executeOnDelegate": True,
                    "permissionCheck": {"actions": ["s3:GetObject"]},
                },
                "testInterval": "2h",
                "orgIdentifier": "default",
            }
        }
    ).to_document(),
    parse_connector(
        {
            "connector": {
                "name": "Inherit",
                "type": "Aws",
                "spec": {"credential": {"type": "InheritFromDelegate"}, "delegateSelectors": ["eks", "prod"]},
            }
        }
    ).to_document(),
    parse_connector(
        {
            "connector": {
                "name": "IRSA",
                "type": "Aws",
                "spec": {"credential": {"type": "Irsa", "region": "cn-north-1"}, "delegateSelectors": ["k8s"]},
            }
        }
    ).to_document(),
    parse_connector(
        {
            "connector": {
                "name": "Platform",
                "type": "Aws",
                "spec": {
                    "credential": {
                        "type": "ManualConfig",
                        "spec": {"accessKey": "AKIAIOSFODNN7EXAMPLE", "secretKeyRef": "s"},
                    },
                    "executeOnDelegate": False,
                },
            }
        }
    ).to_document(),
]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d["connector"]["identifier"])
def test_an_existing_connector_round_trips_through_the_form(document: dict[str, Any]) -> None:
    form = WizardForm.from_document(document)
    # Through the page: every field as hidden inputs, posted back.
    posted = WizardForm.from_form(dict(form.hidden()))
    assert posted == form
    result = check(posted, "connectivity", base=document)
    assert result.ok, result.errors
    assert result.document == document


def test_an_edit_keeps_what_the_wizard_does_not_show() -> None:
    document = DOCUMENTS[0]
    form = WizardForm.from_document(document).with_values(region="eu-west-1", connectivity="any")
    result = check(form, "connectivity", base=document)
    spec = result.document["connector"]["spec"]
    assert spec["permissionCheck"] == {"actions": ["s3:GetObject"]}
    assert spec["credential"]["crossAccountAccess"]["durationSeconds"] == 1800
    assert spec["delegateSelectors"] == []
    assert result.document["connector"]["testInterval"] == "2h"


def test_view_yaml_is_the_harness_yaml_of_the_form() -> None:
    result = check(manual_form(tags="env:prod"), "connectivity")
    text = wizard.to_yaml(result.document)
    assert text.startswith("connector:\n  name: Prod account\n  identifier: Prod_account\n")
    assert _yaml.load(text) == result.document
    assert parse_connector(_yaml.load(text)) == result.connector


def test_the_credential_types_offered_are_those_the_parser_accepts() -> None:
    choices = {c.value: c.label for c in wizard.credential_choices()}
    assert choices["ManualConfig"] == "AWS Access Key"
    assert choices["InheritFromDelegate"] == "Assume IAM Role on Delegate"
    assert choices["Irsa"] == "Use IRSA"
    assert ("OidcAuthentication" in choices) == ("OidcAuthentication" in CREDENTIAL_TYPES)
    assert set(choices) == set(CREDENTIAL_TYPES)


@pytest.mark.skipif("OidcAuthentication" not in CREDENTIAL_TYPES, reason="the parser does not accept OIDC yet")
def test_oidc_round_trips_once_the_parser_accepts_it() -> None:
    form = WizardForm.from_form(
        {
            "name": "oidc",
            "credential_type": "OidcAuthentication",
            "oidc_role_arn": "arn:aws:iam::123456789012:role/oidc",
            "connectivity": "any",
        }
    )
    result = check(form, "connectivity")
    assert result.ok, result.errors
    assert result.document["connector"]["spec"]["credential"]["spec"]["iamRoleArn"] == form.oidc_role_arn
    assert WizardForm.from_document(result.document) == form.with_values(identifier="oidc")


def test_regions_are_grouped_by_partition_with_us_east_1_first_group() -> None:
    groups = wizard.region_groups()
    assert [g.partition for g in groups][:3] == ["aws", "aws-us-gov", "aws-cn"]
    assert "us-east-1" in groups[0].regions
    assert groups[1].label == "GovCloud (US) (aws-us-gov)" and "us-gov-west-1" in groups[1].regions
    assert groups[2].label == "China (aws-cn)" and "cn-north-1" in groups[2].regions
    assert WizardForm().region == "us-east-1"


def test_a_posted_form_ignores_unknown_fields_and_bounds_values() -> None:
    form = WizardForm.from_form({"name": "x" * 10_000, "evil": "1", "region": ["not", "a", "string"]})
    assert len(form.name) == 4096 and form.region == "us-east-1"
    assert "is longer than 128 characters" in check(form, "overview").errors["name"][0]


def test_problems_outside_the_form_name_their_path() -> None:
    document = DOCUMENTS[0]
    broken = {"connector": {**document["connector"], "testInterval": "soon"}}
    form = WizardForm.from_document(document)
    errors = check(form, "connectivity", base=broken).errors
    assert errors["form"][0].startswith("connector.testInterval: ")
    assert check(form, "credentials", base=broken).ok
