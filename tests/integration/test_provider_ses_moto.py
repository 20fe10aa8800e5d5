"""The ``ses`` provider end to end against moto's server mode, a third-party implementation of
the SES v2 API: smtplib -> gateway -> SigV4-signed ``SendEmail`` -> moto, then the sent message
read back from moto's state (``/moto-api/data.json``).

moto checks the signature and the IAM policy of each call (its IAM access control is switched
on once the fixtures are set up), so a request signed wrongly is refused as AWS would.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto import settings as moto_settings
from moto.core.authorization import ActionAuthenticatorMixin
from moto.server import ThreadedMotoServer

from tests.conftest import GatewayFactory, in_thread
from tests.support.fakeapi import Answer, FakeAPI
from tests.support.smtpclient import send

REGION = "eu-west-1"
ADMIN = {"aws_access_key_id": "AKIAADMIN0000000TEST", "aws_secret_access_key": "admin-secret"}
SEND_POLICY = {
    "Version": "2012-10-17",
    # Real IAM checks SendEmail with raw content as ses:SendRawEmail; moto as ses:SendEmail.
    "Statement": [
        {"Effect": "Allow", "Action": ["ses:SendEmail", "ses:SendRawEmail"], "Resource": "*"}
    ],
}


@functools.cache
def _admin_client(url: str, service: str) -> Any:
    # Building a boto3 client loads its service model: once per module, not per test.
    return boto3.client(service, region_name=REGION, endpoint_url=url, **ADMIN)


@dataclass
class Moto:
    url: str
    key_id: str
    secret: str

    def client(self, service: str) -> Any:
        return _admin_client(self.url, service)

    @staticmethod
    @contextlib.contextmanager
    def setup() -> Iterator[None]:
        """moto's IAM checks off for a while: the test sets its world up as an admin."""
        before = moto_settings.INITIAL_NO_AUTH_ACTION_COUNT
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
        try:
            yield
        finally:
            moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = before

    def sent(self) -> list[dict[str, Any]]:
        """The raw messages moto's SES backend took, oldest first."""
        data = httpx.get(f"{self.url}/moto-api/data.json", timeout=5).json()
        messages: list[dict[str, Any]] = data["ses"]["RawMessage"]
        return messages


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Moto:
    """A fresh moto: example.com verified, an IAM user allowed ses:SendEmail, auth on."""
    httpx.post(f"{moto_server}/moto-api/reset", timeout=5).raise_for_status()
    setup = Moto(moto_server, "", "")
    setup.client("sesv2").create_email_identity(EmailIdentity="example.com")
    iam = setup.client("iam")
    iam.create_user(UserName="gateway")
    iam.put_user_policy(
        UserName="gateway", PolicyName="send", PolicyDocument=json.dumps(SEND_POLICY)
    )
    key = iam.create_access_key(UserName="gateway")["AccessKey"]
    # From here on moto verifies every request's SigV4 signature and IAM permissions.
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    return Moto(moto_server, key["AccessKeyId"], key["SecretAccessKey"])


def ses_provider(moto: Moto, **extra: Any) -> dict[str, Any]:
    settings = {
        "type": "ses",
        "region": REGION,
        "endpoint_url": moto.url,
        "access_key_id": moto.key_id,
        "secret_access_key": moto.secret,
        "timeout": "5s",
    }
    return {"ses": {**settings, **extra}}


def message(to: str = "Alice <alice@example.net>", **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "App <app@example.com>"
    msg["To"] = to
    msg["Subject"] = "Your invoice"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Invoice attached.\n")
    return msg.as_bytes()


async def test_sends_raw_mime_with_the_envelope(start_gateway: GatewayFactory, moto: Moto) -> None:
    gw = await start_gateway(providers=ses_provider(moto), delivery={"mode": "sync"})
    data = message(
        Cc="bob@example.net",
        Bcc="hidden@example.org",
        X_SES_CONFIGURATION_SET="transactional",
        X_SES_MESSAGE_TAGS="campaign=invoice",
    )
    rcpts = ("alice@example.net", "bob@example.net", "hidden@example.org")
    code, text = await in_thread(send, gw.port(), data, sender="app@example.com", rcpts=rcpts)

    [sent] = moto.sent()
    assert (code, text) == (250, f"2.0.0 Ok: {sent['id']}")
    assert sent["source"] == "app@example.com"  # FromEmailAddress = the envelope sender
    # moto adds the To/Cc header addresses to the Destination list (real SES does not);
    # every envelope recipient is there, the Bcc one only through the envelope.
    assert {parseaddr(d)[1] for d in sent["destinations"]} == set(rcpts)
    head = sent["raw_data"].split("\r\n\r\n", 1)[0].lower()
    assert head.startswith("received: ")
    assert "\r\nbcc:" not in head
    assert "x-ses-" not in head  # control headers become ConfigurationSetName / EmailTags
    assert "subject: your invoice" in head
    assert "hidden@example.org" not in sent["raw_data"]


async def test_null_sender_sends_as_the_from_address(
    start_gateway: GatewayFactory, moto: Moto
) -> None:
    gw = await start_gateway(providers=ses_provider(moto), delivery={"mode": "sync"})
    code, text = await in_thread(send, gw.port(), message(), sender="", rcpts=("a@example.net",))
    assert code == 250, text
    [sent] = moto.sent()
    assert sent["source"] == "app@example.com"


async def test_more_than_50_recipients_take_several_calls(
    start_gateway: GatewayFactory, moto: Moto
) -> None:
    gw = await start_gateway(
        providers=ses_provider(moto), delivery={"mode": "sync"}, smtp={"max_recipients": 120}
    )
    rcpts = tuple(f"user{i:03}@example.net" for i in range(120))
    data = message(to="undisclosed-recipients:;")
    code, text = await in_thread(send, gw.port(), data, rcpts=rcpts)

    sent = moto.sent()
    assert [len(m["destinations"]) for m in sent] == [50, 50, 20]
    assert [d for m in sent for d in m["destinations"]] == list(rcpts)  # each exactly once
    assert code == 250
    assert text.startswith(f"2.0.0 Ok: {sent[0]['id']},{sent[1]['id']}")  # the reply is bounded


async def test_large_message_is_signed_correctly(start_gateway: GatewayFactory, moto: Moto) -> None:
    gw = await start_gateway(providers=ses_provider(moto), delivery={"mode": "sync"})
    msg = EmailMessage()
    msg["From"] = "app@example.com"
    msg["To"] = "alice@example.net"
    msg["Subject"] = "Big"
    msg.set_content("See attachment.\n")
    # Over the provider's 256 KiB threshold for building and signing in a thread.
    msg.add_attachment(bytes(range(256)) * 1600, maintype="application", subtype="octet-stream")
    code, text = await in_thread(send, gw.port(), msg.as_bytes(), rcpts=("alice@example.net",))
    assert code == 250, text
    [sent] = moto.sent()
    assert len(sent["raw_data"]) > 500_000


async def test_unverified_sender_is_550_5_7_1(start_gateway: GatewayFactory, moto: Moto) -> None:
    gw = await start_gateway(providers=ses_provider(moto), delivery={"mode": "sync"})
    code, text = await in_thread(
        send, gw.port(), message(), sender="app@unverified.example", rcpts=("a@example.net",)
    )
    assert code == 550, text
    assert text.startswith("5.7.1 ")
    assert "code=MessageRejected" in text
    assert moto.sent() == []


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"secret_access_key": "not-the-secret"}, "SignatureDoesNotMatch"),
        ({"access_key_id": "AKIAUNKNOWN000000000"}, "InvalidClientTokenId"),
    ],
)
async def test_bad_credentials_are_451_4_3_5(
    start_gateway: GatewayFactory, moto: Moto, changes: dict[str, str], code: str
) -> None:
    gw = await start_gateway(
        providers=ses_provider(moto, **changes),
        delivery={"mode": "sync", "sync_timeout": "2s"},
    )
    got, text = await in_thread(send, gw.port(), message(), rcpts=("a@example.net",))
    assert (got, text[:5]) == (451, "4.3.5"), text
    assert f"code={code}" in text
    assert moto.sent() == []


async def test_missing_permission_is_451_4_3_5(start_gateway: GatewayFactory, moto: Moto) -> None:
    with moto.setup():
        moto.client("iam").delete_user_policy(UserName="gateway", PolicyName="send")
    gw = await start_gateway(providers=ses_provider(moto), delivery={"mode": "sync"})
    got, text = await in_thread(send, gw.port(), message(), rcpts=("a@example.net",))
    assert (got, text[:5]) == (451, "4.3.5"), text
    assert moto.sent() == []


async def test_container_role_credentials_from_the_aws_chain(
    start_gateway: GatewayFactory,
    moto: Moto,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """No keys in the config: the chain finds an ECS/EKS-style role endpoint, whose temporary
    credentials (STS AssumeRole on moto) sign the call, session token included. The first set
    expires within botocore's refresh window, so the provider refreshes it, off the loop."""
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }

    def role_credentials(role_arn: str, minutes: int) -> Answer:
        """What an ECS task role endpoint answers: AssumeRole credentials, our expiry."""
        creds = moto.client("sts").assume_role(RoleArn=role_arn, RoleSessionName="relay")
        expires = datetime.now(UTC) + timedelta(minutes=minutes)
        return Answer(
            200,
            json={
                "AccessKeyId": creds["Credentials"]["AccessKeyId"],
                "SecretAccessKey": creds["Credentials"]["SecretAccessKey"],
                "Token": creds["Credentials"]["SessionToken"],
                "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        )

    with moto.setup():
        iam = moto.client("iam")
        role = iam.create_role(RoleName="relay", AssumeRolePolicyDocument=json.dumps(trust))
        iam.put_role_policy(
            RoleName="relay", PolicyName="send", PolicyDocument=json.dumps(SEND_POLICY)
        )
        first = role_credentials(role["Role"]["Arn"], 12)
        second = role_credentials(role["Role"]["Arn"], 60)

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "empty").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "empty"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    async with FakeAPI() as endpoint:
        endpoint.push(first, second)
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{endpoint.url}/v2/credentials")
        settings = ses_provider(moto)
        del settings["ses"]["access_key_id"], settings["ses"]["secret_access_key"]
        gw = await start_gateway(providers=settings, delivery={"mode": "sync"})
        for _ in range(2):
            code, text = await in_thread(send, gw.port(), message(), rcpts=("a@example.net",))
            assert code == 250, text
        # One fetch at first use, one refresh: the 12-minute set is inside botocore's
        # 15-minute advisory window, the 60-minute one is not.
        assert [r.path for r in endpoint.requests] == ["/v2/credentials"] * 2
    assert len(moto.sent()) == 2
