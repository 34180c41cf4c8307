"""The webhook URL is a secret (issue 16, finding 13): a failed POST logs its host only, the policy
the Admin API returns holds it redacted, and applying that redacted form back keeps the URL.

The failing webhook is a real ``ThreadingHTTPServer`` on 127.0.0.1 answering 500 (and a closed
port); the log lines are the real ones, captured.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import Iterator

import pytest

from meshserve.common.policy.config import WebhookSpec
from meshserve.controlplane.observe.webhook import (
    Webhook,
    redact_policy,
    redact_url,
    restore_policy,
)
from meshserve.controlplane.validation import validate_policy
from meshserve.protos import mesh_pb2
from tests.support.webhook import failing_receiver

TOKEN = secrets.token_hex(16)


@pytest.fixture
def failing() -> Iterator[str]:
    with failing_receiver(TOKEN) as url:
        yield url


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://user:{TOKEN}@127.0.0.1:{port}/hooks/{TOKEN}"


@pytest.mark.parametrize("how", ["HTTP 500", "connection refused"])
async def test_a_failed_post_logs_the_host_not_the_url(
    failing: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = failing if how == "HTTP 500" else _closed_port_url()
    spec = WebhookSpec(url=url, max_retries=0, min_interval_s=0, timeout_s=2)
    hook = Webhook(lambda: spec)
    hook.start()
    caplog.set_level(logging.DEBUG)
    try:
        hook.offer(mesh_pb2.Event(kind="drift", model="m", variant="v", message="drifted"))
        for _ in range(200):  # at most 10 s
            if hook.stats["failed"]:
                break
            await asyncio.sleep(0.05)
    finally:
        await hook.close()
    assert hook.stats["failed"] == 1
    lines = [r.getMessage() for r in caplog.records]
    dropped = [line for line in lines if "event dropped" in line]
    assert dropped and redact_url(url) in dropped[0], lines
    assert not any(TOKEN in line for line in lines), lines


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://hooks.example/services/T0/B1/secret", "https://hooks.example/\u2026"),
        ("http://user:pw@127.0.0.1:8080/x?token=1", "http://127.0.0.1:8080/\u2026"),
        ("https://[::1]:9/a", "https://[::1]:9/\u2026"),
        ("https://hooks.example", "https://hooks.example/\u2026"),
    ],
)
def test_redact_url_keeps_scheme_host_and_port_only(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


POLICY = (
    "name: watched  # a comment stays\n"
    "monitoring:\n"
    "  min_accuracy: 0.9\n"
    "  webhook:\n"
    f"    url: https://hooks.example/services/{TOKEN}\n"
    "    max_retries: 1\n"
)


def test_the_policy_returned_holds_the_url_redacted_and_applying_it_back_keeps_the_url() -> None:
    shown = redact_policy(POLICY)
    assert TOKEN not in shown
    assert "url: https://hooks.example/\u2026" in shown and "# a comment stays" in shown
    validate_policy(shown)  # what an admin gets back is a valid policy
    edited = shown.replace("max_retries: 1", "max_retries: 2")
    applied = restore_policy(edited, POLICY)
    assert applied == POLICY.replace("max_retries: 1", "max_retries: 2")
    new = edited.replace("https://hooks.example/\u2026", "https://other.example/new")
    assert restore_policy(new, POLICY) == new, "a new URL is applied as given"
    assert restore_policy(POLICY, None) == POLICY
    plain = "name: p\ndefault:\n  scores: {least_loaded: 1}\n"
    assert redact_policy(plain) == plain
