"""etcd soak: how big etcd's database grows under a noisy node, and what an etcd outage costs.

One mesh of real processes on loopback (etcd, one control-plane replica, two nodes). For
``--duration`` seconds a noisy cycle repeats: a model is registered from an HTTP artifact served
slowly (a download of a few seconds, reporting progress every 0.5 s), loaded on both nodes, then
removed (unloaded) -- the churn that rewrote node records in etcd on every progress report
(issue 14 §5). Every ``--sample-s`` the store's status is read: revision, ``dbSize`` and
``dbSizeInUse`` (etcd's own figures). The leader compacts as it does in production (keeping
10,000 revisions).

With ``--outage-s N`` (after the soak) etcd is stopped for N seconds and the replica's CPU time
is measured from /proc/<pid>/stat over that window (issue 14 §4: < 5 % of a core), then the
replica is sent SIGTERM with etcd still down and its exit time measured.

Prints one JSON object; progress on stderr. Every loop is bounded in time and count.

    .venv/bin/python bench/etcd_soak.py                      # 10 minutes + 30 s outage
    .venv/bin/python bench/etcd_soak.py --duration 60 --outage-s 10
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._report import emit
from meshserve.client._admin import AdminClient
from meshserve.controlplane.etcd import connect
from meshserve.controlplane.etcd._client import RevisionCompactedError, status, watch
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.devtools.local import LocalMesh, wait_until
from meshserve.protos import mesh_pb2


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Serves the files of :attr:`root` in 32 KiB pieces, 0.1 s apart."""

    root = Path()

    def do_GET(self) -> None:
        payload = (self.root / self.path.strip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        step = 32 << 10
        for start in range(0, len(payload), step):
            self.wfile.write(payload[start : start + step])
            self.wfile.flush()
            time.sleep(0.1)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _status(url: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        client = await connect(url)
        try:
            st = await status(client)
            return {
                "revision": st.revision,
                "db_size": st.db_size,
                "db_size_in_use": st.db_size_in_use,
            }
        finally:
            await client.close()

    return asyncio.run(read())


def _compacted(url: str) -> bool:
    """Whether etcd's history before revision 2 is gone (the leader compacted it): a watch
    from there fails with RevisionCompactedError instead of replaying the first writes."""

    async def probe() -> bool:
        client = await connect(url)
        try:
            stream = await watch(client, b"/", start_revision=2, prefix=True)
            try:
                async with asyncio.timeout(5.0):
                    async for _ in stream:
                        return False
            except RevisionCompactedError:
                return True
            finally:
                await stream.cancel()
            return False
        finally:
            await client.close()

    return asyncio.run(probe())


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _ready(admin: AdminClient, model: str) -> int:
    return sum(
        c.state == mesh_pb2.READY for n in admin.list_nodes() for c in n.copies if c.model == model
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--outage-s", type=float, default=30.0, help="0: no outage measurement")
    p.add_argument("--keep", type=int, default=1000, help="--etcd-keep-revisions of the replica")
    p.add_argument("--out", type=Path, default=None)
    ns = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="etcd-soak-"))
    _Trickle.root = work / "artifacts"
    _Trickle.root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    result: dict[str, Any] = {
        "duration_s": ns.duration,
        "etcd_keep_revisions": ns.keep,
        "artifact_bytes": 0,
    }
    samples: list[dict[str, Any]] = []
    try:
        with LocalMesh(work, lease_ttl_s=5) as mesh:
            url = mesh.start_etcd()
            cp = mesh.start_controlplane("cp-1", extra=["--etcd-keep-revisions", str(ns.keep)])
            for name in ("n1", "n2"):
                mesh.start_node(name, [cp.address])
            with AdminClient(cp.address) as admin:
                wait_until(lambda: len(admin.list_nodes()) == 2, 30, what="nodes linked")
                started = time.monotonic()
                samples.append({"t_s": 0.0, **_status(url)})
                next_sample = started + ns.sample_s
                cycles = 0
                while time.monotonic() - started < ns.duration:
                    name = f"noisy-{cycles % 3}"
                    # a new artifact each cycle: the nodes' caches never spare the download
                    model = make_mlp(
                        _Trickle.root / f"m{cycles}.onnx", hidden=(160, 160), seed=cycles
                    )
                    result["artifact_bytes"] = model.stat().st_size
                    admin.register_model(name, f"{base}/{model.name}", sha256_file(model), copies=2)
                    wait_until(lambda n=name: _ready(admin, n) >= 2, 60, what=f"{name} ready")
                    admin.remove_model(name)
                    wait_until(lambda n=name: _ready(admin, n) == 0, 60, what=f"{name} unloaded")
                    cycles += 1
                    model.unlink()
                    if time.monotonic() >= next_sample:
                        sample = {"t_s": round(time.monotonic() - started, 1), **_status(url)}
                        samples.append(sample)
                        _log(f"soak: {cycles} cycles, {sample}")
                        next_sample += ns.sample_s
                samples.append({"t_s": round(time.monotonic() - started, 1), **_status(url)})
                result["cycles"] = cycles
            result["compacted"] = _compacted(url)
            result["samples"] = samples
            result["final"] = samples[-1]
            result["final_db_mib"] = round(samples[-1]["db_size"] / 2**20, 2)
            result["final_db_in_use_mib"] = round(samples[-1]["db_size_in_use"] / 2**20, 2)
            if ns.outage_s > 0:
                mesh.etcd.stop()
                time.sleep(2.0)
                before, t0 = _cpu_seconds(cp.pid), time.monotonic()
                time.sleep(ns.outage_s)
                elapsed = time.monotonic() - t0
                share = (_cpu_seconds(cp.pid) - before) / elapsed
                t1 = time.monotonic()
                cp.signal(signal.SIGTERM)
                exited = cp._reap(60.0)
                result["outage"] = {
                    "window_s": round(elapsed, 1),
                    "cp_cpu_share_of_a_core": round(share, 4),
                    "sigterm_exit_s": round(time.monotonic() - t1, 2) if exited else None,
                }
                _log(f"outage: {result['outage']}")
    finally:
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    emit(result, ns.out)


if __name__ == "__main__":
    main()
