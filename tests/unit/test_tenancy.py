"""Whose query it is, carried from a router to the node (issue 16, finding 11): the digest of the
caller's API key a router forwards, and the tenant a node reads from it (its rights' grants)."""

from __future__ import annotations

import contextvars
import hashlib

from meshserve.common.tenancy import CALLER_KEY, bind_caller, caller_pairs, key_digest
from meshserve.node.rights import Rights
from meshserve.protos import mesh_pb2

ACME, GLOBEX = "acme-" + "a" * 20, "globex-" + "b" * 20


def _rights() -> Rights:
    rights = Rights("n1", fail_closed=False)
    rights.update(
        mesh_pb2.TenantRights(
            enforce=True,
            grants=[
                mesh_pb2.TenantGrant(
                    key_sha256=hashlib.sha256(key.encode()).digest(), tenant=name, models=["*"]
                )
                for key, name in ((ACME, "acme"), (GLOBEX, "globex"))
            ],
        )
    )
    return rights


def test_the_caller_digest_is_of_the_api_key_or_the_bearer() -> None:
    want = hashlib.sha256(ACME.encode()).hexdigest()
    assert key_digest([("x-api-key", ACME)]) == want
    assert key_digest([("authorization", f"Bearer {ACME}")]) == want
    assert key_digest([("x-client-id", "me")]) == ""


def test_a_forward_names_the_bound_caller_of_its_request_only() -> None:
    def request(metadata: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        bind_caller(metadata)
        return caller_pairs()

    # each request runs in its own context (its own task), as gRPC's do
    forwarded = contextvars.copy_context().run(request, [("x-api-key", ACME)])
    assert forwarded == ((CALLER_KEY, key_digest([("x-api-key", ACME)])),)
    assert contextvars.copy_context().run(request, []) == ()
    assert caller_pairs() == (), "nothing leaks into the caller's context"


def test_a_node_reads_the_tenant_a_router_names_from_its_grants() -> None:
    rights = _rights()
    for key, tenant in ((ACME, "acme"), (GLOBEX, "globex")):
        pairs = [(CALLER_KEY, key_digest([("x-api-key", key)]))]
        assert rights.forwarded(pairs) == tenant
    assert rights.forwarded([(CALLER_KEY, "00" * 32)]) == "", "no grant: nobody's"
    assert rights.forwarded([(CALLER_KEY, "not hex")]) == ""
    assert rights.forwarded([]) == ""
    assert (
        Rights("n1", fail_closed=False).forwarded([(CALLER_KEY, key_digest([("x-api-key", ACME)]))])
        == ""
    )
