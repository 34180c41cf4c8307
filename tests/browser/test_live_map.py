"""The live map (issue 18) in a real headless Chromium, against a real mesh on loopback.

One mesh for the module: a real etcd, two control-plane replicas (cp-1 serves the map openly on
loopback; cp-2 serves it behind its admin token), a core node with a direct port (zone a) and
two tunnel-only edge nodes (zone b), lease TTL 3 s. The tests run in order on one page of cp-1:
the nodes show (the edge ones tunneled); a registered model's copies appear and turn READY
without a reload (pushed: the page never polls); the timeline shows the placement; a drain
shows on the node; kill -9 of a node removes it within 10 s; the secured replica refuses a page
without its token, refuses a wrong one and opens with the right one. Screenshots of the map are
saved under ``test-artifacts/browser/``.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshserve.client._admin import AdminClient
from meshserve.common.errors import Unauthenticated
from meshserve.devtools.demo_models import make_mlp
from meshserve.devtools.local import LocalMesh, ManagedProcess, free_port, wait_until
from tests.browser.conftest import ARTIFACTS
from tests.support.mesh import register_file, wait_copies

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOKEN = "map-admin-token-0123456789"
VIEWER = "map-viewer-token-9876543210"
MODEL = "mlp"


@dataclass
class Mesh:
    local: LocalMesh
    tmp: Path
    cp: str  # cp-1's gRPC address (the admin client's target)
    ui: str  # cp-1's map (open)
    secured_ui: str  # cp-2's map (admin token)
    secured_grpc: str  # cp-2's gRPC address
    nodes: dict[str, ManagedProcess]
    page: Any = None
    requests: list[str] = field(default_factory=list)  # every URL the page asked for

    def admin(self) -> AdminClient:
        return AdminClient(self.cp, timeout=10)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("map")
    token_file = tmp / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    viewer_file = tmp / "viewer.token"
    viewer_file.write_text(VIEWER + "\n")
    viewer_file.chmod(0o600)
    ui, secured = free_port(), free_port()
    with LocalMesh(tmp, lease_ttl_s=3) as local:
        local.start_etcd()
        cp1 = local.start_controlplane("cp-1", extra=["--ui-listen", f"127.0.0.1:{ui}"])
        cp2 = local.start_controlplane(
            "cp-2",
            extra=[
                *("--ui-listen", f"127.0.0.1:{secured}"),
                *("--admin-token-file", str(token_file)),
                *("--ui-viewer-token-file", str(viewer_file)),
            ],
        )
        planes = [cp1.address, cp2.address]
        nodes = {
            "core-1": local.start_node(
                "core-1", planes, labels={"tier": "core", "zone": "a"}, direct=True
            ),
            "edge-1": local.start_node("edge-1", planes, labels={"tier": "edge", "zone": "b"}),
            "edge-2": local.start_node("edge-2", planes, labels={"tier": "edge", "zone": "b"}),
        }
        m = Mesh(
            local,
            tmp,
            cp1.address,
            f"http://127.0.0.1:{ui}",
            f"http://127.0.0.1:{secured}",
            cp2.address,
            nodes,
        )
        with m.admin() as admin:
            wait_until(lambda: len(admin.list_nodes()) >= 3, 60, what="three nodes to join")
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        page = context.new_page()
        page.on("request", lambda request: m.requests.append(request.url))
        page.goto(m.ui + "/")
        m.page = page
        try:
            yield m
        finally:
            context.close()


def _shot(page: Any, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _node(page: Any, node_id: str) -> Any:
    return page.locator(f'[data-node="{node_id}"].node')


def test_the_map_shows_the_core_node_and_the_tunneled_edge_nodes(mesh: Mesh) -> None:
    page = mesh.page
    page.wait_for_selector('[data-node="core-1"].node', timeout=15_000)
    page.wait_for_selector('[data-node="edge-1"].node.tunneled', timeout=15_000)
    core = _node(page, "core-1")
    assert "tunneled" not in (core.get_attribute("class") or "")
    assert "127.0.0.1:" in (core.text_content() or "")  # its direct address
    assert "tunnel" in (_node(page, "edge-1").text_content() or "").lower()
    assert page.locator("#conn").inner_text().strip().lower() == "live"
    _shot(page, "01-nodes")


def test_a_registered_model_appears_and_turns_ready_without_a_reload(mesh: Mesh) -> None:
    page = mesh.page
    model = make_mlp(mesh.tmp / "mlp.onnx")
    with mesh.admin() as admin:
        register_file(admin, MODEL, model, copies=2)
        wait_copies(admin, MODEL, 2)
    # (no wait_for_function: the page's CSP forbids eval, and the test keeps the CSP on)
    page.locator(f'[data-copy="{MODEL}/default"].state-ready').nth(1).wait_for(timeout=15_000)
    page.wait_for_selector(f'#models [data-model="{MODEL}"]', timeout=10_000)
    _shot(page, "02-model-ready")
    loads = [u for u in mesh.requests if "/api/" in u]
    assert any(u.endswith("/api/stream") for u in loads), loads
    assert not [u for u in loads if "/api/state" in u], f"the page polled: {loads}"


def test_queries_show_as_flows_to_the_nodes_that_answer(mesh: Mesh) -> None:
    """A bounded query loop through cp-1's gateway: the page draws a flow to a node that answers
    and shows the model's req/s (from the nodes' telemetry: two reports make a rate)."""
    import numpy as np

    from meshserve.client import MeshClient

    stop = threading.Event()

    def load() -> None:
        x = np.ones((1, 64), np.float32)
        with MeshClient(mesh.cp, timeout=5, routing="gateway") as client:
            for _ in range(5_000):  # bounded in count and by stop (set below, ≤ 20 s)
                if stop.is_set():
                    return
                client.infer(MODEL, {"x": x})
                time.sleep(0.005)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        mesh.page.locator(".flow").first.wait_for(timeout=20_000)
        _shot(mesh.page, "02b-flows")
    finally:
        stop.set()
        worker.join(10)
    assert mesh.page.locator(".flow").count() >= 1


def test_the_timeline_shows_the_placement(mesh: Mesh) -> None:
    page = mesh.page
    row = page.locator('#timeline .event[data-kind="placement"]', has_text=MODEL).first
    row.wait_for(timeout=10_000)
    page.select_option("#kind-filter", "placement")
    kinds = page.eval_on_selector_all(
        "#timeline .event",
        "rows => rows.filter(r => r.offsetParent !== null).map(r => r.dataset.kind)",
    )
    assert kinds and set(kinds) == {"placement"}, kinds
    page.select_option("#kind-filter", index=0)  # all again


def test_clicking_a_model_explains_its_placement(mesh: Mesh) -> None:
    page = mesh.page
    page.locator(f'#models [data-model="{MODEL}"]').first.click()
    detail = page.locator("#detail")
    detail.wait_for(timeout=10_000)
    page.locator("#detail", has_text="core-1").wait_for(timeout=10_000)
    _shot(page, "03-explain")
    page.click("#detail-close")
    detail.wait_for(state="hidden", timeout=5_000)


def test_a_drain_shows_on_the_node(mesh: Mesh) -> None:
    page = mesh.page
    with mesh.admin() as admin:
        admin.drain_node("edge-1")
        try:
            page.wait_for_selector('[data-node="edge-1"].node.draining', timeout=10_000)
            _shot(page, "04-draining")
        finally:
            admin.drain_node("edge-1", undrain=True)
    page.locator('[data-node="edge-1"].node.draining').wait_for(state="detached", timeout=10_000)


def test_kill_9_of_a_node_removes_it_within_10_s(mesh: Mesh) -> None:
    page = mesh.page
    page.wait_for_selector('[data-node="edge-2"].node', timeout=10_000)
    started = time.monotonic()
    mesh.nodes["edge-2"].kill()
    _node(page, "edge-2").wait_for(state="detached", timeout=10_000)
    gone_after = time.monotonic() - started
    assert gone_after < 10.0, gone_after
    _shot(page, "05-node-killed")


def _get(url: str, **headers: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_with_an_admin_token_the_map_refuses_a_page_without_it(mesh: Mesh, browser: Any) -> None:
    for path in ("/api/state", "/api/stream", "/api/explain?model=mlp", "/api/whoami"):
        status, body = _get(mesh.secured_ui + path)
        assert status == 401, (path, status, body)
    status, _ = _get(mesh.secured_ui + "/api/state", Authorization="Bearer wrong")
    assert status == 401
    status, state = _get(mesh.secured_ui + "/api/state", Authorization=f"Bearer {TOKEN}")
    assert status == 200 and {n["id"] for n in state["nodes"]} >= {"core-1", "edge-1"}
    text = json.dumps(state)
    assert TOKEN not in text and "file://" not in text  # no secret, no artifact URI
    status, _ = _get(mesh.secured_ui + "/api/state", Authorization=f"Bearer {VIEWER}")
    assert status == 200  # the read-only viewer token opens the map...
    with (
        AdminClient(mesh.secured_grpc, timeout=10, token=VIEWER) as viewer,
        pytest.raises(Unauthenticated),
    ):
        viewer.list_nodes()  # ...and nothing else

    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    try:
        page = context.new_page()
        page.goto(mesh.secured_ui + "/")
        page.wait_for_selector("#token", timeout=10_000)
        assert page.locator('[data-node="core-1"]').count() == 0
        page.fill("#token", "not-the-token")
        page.click("#login")
        page.locator("#login-error", has_text="wrong").wait_for(timeout=10_000)
        _shot(page, "06-login-refused")
        page.fill("#token", TOKEN)
        page.click("#login")
        page.wait_for_selector('[data-node="core-1"].node', timeout=15_000)
        assert TOKEN not in page.content()
        cookies = context.cookies()
        assert all(TOKEN not in c["value"] for c in cookies)
        assert any(c["name"] == "meshserve_ui" and c["httpOnly"] for c in cookies)
        _shot(page, "07-secured-map")
    finally:
        context.close()


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else None
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def test_bad_requests_get_a_clear_answer(mesh: Mesh) -> None:
    status, body = _get(mesh.ui + "/api/explain")
    assert status == 400 and "model" in body["error"]
    status, body = _get(mesh.ui + "/api/explain?model=no-such-model")
    assert status == 404 and "no-such-model" in body["error"]
    status, body = _get(mesh.ui + "/api/explain?model=" + "m" * 300)
    assert status == 400
    for path in ("/static/server.py", "/static/..%2Fserver.py", "/static/%2e%2e/view.py"):
        request = urllib.request.Request(mesh.ui + path)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 404, path
    # the secured replica: garbage, a wrong shape, an oversized body
    status, body = _post(mesh.secured_ui + "/api/login", b"not json")
    assert status == 400 and "token" in body["error"]
    status, body = _post(mesh.secured_ui + "/api/login", b'{"token": 5}')
    assert status == 401
    status, _ = _post(mesh.secured_ui + "/api/login", b'{"token": "' + b"x" * 10_000 + b'"}')
    assert status == 413
    status, body = _get(mesh.ui + "/api/state")  # the open replica still answers
    assert status == 200 and body["replica"]["id"] == "cp-1"
