"""The demo's connectors, in Harness YAML, and the outcome each one must have."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from agent.demo.standin import EXTERNAL_ID, Seeded


@dataclass(frozen=True)
class Case:
    identifier: str
    yaml: str
    #: "SUCCESS", or the failure category the demo must show.
    expect: str
    expect_step: str | None = None
    why: str = ""
    pickup_timeout: float | None = None

    @property
    def document(self) -> Any:
        return yaml.safe_load(self.yaml)


def _manual(
    identifier: str, name: str, key: str, ref: str, selectors: str, *, region: str = "us-east-1", extra: str = ""
) -> str:
    return f"""\
connector:
  name: {name}
  identifier: {identifier}
  type: Aws
  spec:
    credential:
      type: ManualConfig
      spec:
        accessKey: {key}
        secretKeyRef: {ref}
{extra}      region: {region}
    delegateSelectors: [{selectors}]
    executeOnDelegate: true
"""


def cases(s: Seeded) -> list[Case]:
    cross = f"""\
      crossAccountAccess:
        crossAccountRoleArn: {s.cross_account_role}
        externalId: {EXTERNAL_ID}
"""
    wrong = cross.replace(EXTERNAL_ID, "not-the-agreed-id")
    return [
        Case(
            "aws_access_key",
            _manual(
                "aws_access_key", "Access key (secret reference)", s.deployer_key, "account.deployer_secret_key", "eks"
            ),
            "SUCCESS",
        ),
        Case(
            "aws_irsa",
            """\
connector:
  name: IRSA
  identifier: aws_irsa
  type: Aws
  spec:
    credential:
      type: Irsa
      spec: {}
    delegateSelectors: [eks, prod]
""",
            "SUCCESS",
        ),
        Case(
            "aws_oidc",
            f"""\
connector:
  name: OIDC (no stored key)
  identifier: aws_oidc
  type: Aws
  spec:
    credential:
      type: OidcAuthentication
      spec:
        iamRoleArn: {s.oidc_role}
    delegateSelectors: [eks]
""",
            "SUCCESS",
        ),
        Case(
            "aws_node_role",
            """\
connector:
  name: Inherit from delegate (EC2 node role)
  identifier: aws_node_role
  type: Aws
  spec:
    credential:
      type: InheritFromDelegate
    delegateSelectors: [ec2]
""",
            "SUCCESS",
        ),
        Case(
            "aws_cross_account",
            _manual(
                "aws_cross_account",
                "Cross-account with External ID",
                s.deployer_key,
                "account.deployer_secret_key",
                "eks",
                extra=cross,
            ),
            "SUCCESS",
        ),
        Case(
            "aws_govcloud",
            _manual("aws_govcloud", "GovCloud test region", s.gov_key, "gov_secret_key", "gov", region="us-gov-west-1"),
            "SUCCESS",
        ),
        Case(
            "aws_no_describe_regions",
            _manual(
                "aws_no_describe_regions",
                "User without ec2:DescribeRegions",
                s.auditor_key,
                "account.auditor_secret_key",
                "eks",
            ),
            "permission_denied",
            "describe_regions",
            "the auditor user lacks ec2:DescribeRegions",
        ),
        Case(
            "aws_wrong_external_id",
            _manual(
                "aws_wrong_external_id",
                "Cross-account, wrong External ID",
                s.deployer_key,
                "account.deployer_secret_key",
                "eks",
                extra=wrong,
            ),
            "assume_role_denied",
            "assume_role",
            "the trust policy wants another External ID",
        ),
        Case(
            "aws_no_matching_delegate",
            _manual(
                "aws_no_matching_delegate",
                "Selectors no delegate has",
                s.deployer_key,
                "account.deployer_secret_key",
                "gov, prod",
            ),
            "no_eligible_delegate",
            "delegate_selection",
            "no delegate has both tags gov and prod",
            pickup_timeout=1.0,
        ),
    ]
