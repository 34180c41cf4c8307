"""Zero-downtime rollout with real processes: a closed loop of queries through the gateway while
the `live` alias of a model moves v1 -> canary v2 (50 %) -> v2 -> rollback to v1 -> v3 (with
meshctl). No query fails, and every answer is the one in-process onnxruntime gives for the
version that says it answered. And versions are not variants: the first version registered is
`live`, a later one takes no traffic until a rollout moves `live` (issue 14 §1)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.common.errors import FailedPrecondition, InvalidArgument, NotFound, StatusError
from meshserve.devtools.demo_models import make_mlp, reference_outputs
from meshserve.devtools.local import LocalMesh
from tests.support.mesh import register_file, wait_copies
from tests.support.rollout import roll_out, wait_shifted
from tests.support.workers import Workers

XS = [np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32) for i in range(8)]
MAX_QUERIES = 20_000  # per worker: the loop is bounded in count and in time
LOOP_S = 30.0


@dataclass(frozen=True)
class Answer:
    started: float
    input: int
    version: str
    y: Any


class QueryLoop(Workers):
    """Closed loops of queries that name no version (they follow `live`), in threads."""

    def __init__(self, address: str, workers: int = 2) -> None:
        self.answers: list[Answer] = []
        self.failures: list[str] = []
        self._address = address
        super().__init__(workers)

    def _run(self, seed: int) -> None:
        address = self._address
        rng = np.random.default_rng(100 + seed)
        end = time.monotonic() + LOOP_S
        # through the gateway: the checks below say an alias move holds "at once" after the
        # Admin call returns, which is the gateway's view (an SDK routing itself sees the move
        # when the routing feed brings it, a moment later)
        with MeshClient(address, timeout=10, routing="gateway") as client:
            for _ in range(MAX_QUERIES):
                if self._stop.is_set() or time.monotonic() > end:
                    return
                k = int(rng.integers(len(XS)))
                started = time.monotonic()
                try:
                    result = client.infer("clf", {"x": XS[k]})
                except StatusError as exc:
                    self.failures.append(f"{exc.code.name}: {exc.message}")
                    continue
                self.answers.append(Answer(started, k, result.variant, result["y"]))

    def between(self, start: float, end: float = float("inf")) -> Counter[str]:
        return Counter(a.version for a in list(self.answers) if start <= a.started < end)


def meshctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "meshserve.client.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_a_new_version_takes_no_traffic_until_live_moves_to_it(tmp_path: Path) -> None:
    """v1 -> register v2 (meshctl) -> 100/100 still v1 -> canary 20 % -> ~20 % v2 -> full ->
    rollback -> v1; meshctl's tree and explain agree with what the gateway does."""
    paths = {v: make_mlp(tmp_path / f"{v}.onnx", seed=s) for v, s in (("v1", 1), ("v2", 2))}
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        mesh.start_node("n1", [cp.address], direct=True)
        target = ("-t", cp.address)
        # through the gateway: meshctl's tree and explain are checked against what it does
        with (
            AdminClient(cp.address) as admin,
            MeshClient(cp.address, timeout=10, routing="gateway") as client,
        ):

            def mix(n: int) -> Counter[str]:
                return Counter(
                    client.infer("flower", {"x": XS[i % len(XS)]}).variant for i in range(n)
                )

            first = meshctl("models", "register", "flower", "--artifact", str(paths["v1"]),
                            "--version", "v1", *target)  # fmt: skip
            assert first.returncode == 0, first.stdout + first.stderr
            assert "registered flower version v1 variant v1 (1 copy); live" in first.stdout
            [live] = admin.list_aliases("flower")
            assert (live.alias.alias, live.alias.version, live.serving) == ("live", "v1", "v1")
            assert mix(10) == {"v1": 10}

            second = meshctl("models", "register", "flower", "--artifact", str(paths["v2"]),
                             "--version", "v2", *target)  # fmt: skip
            assert second.returncode == 0, second.stdout + second.stderr
            assert "registered flower version v2" in second.stdout, "a new version is no update"
            assert "live stays on v1 until `meshctl model rollout flower v2" in second.stdout
            wait_copies(admin, "flower", 2)  # v2 is loaded and warm, and still takes nothing
            assert mix(100) == {"v1": 100}
            tree = meshctl("models", "list", *target)
            assert tree.returncode == 0, tree.stdout + tree.stderr
            rows = [
                [cell.strip() for cell in line.split("│")]
                for line in tree.stdout.splitlines()
                if "flower" in line
            ]
            assert [r[2:5] for r in rows] == [["v1", "live", "v1"], ["v2", "-", "v2"]], tree.stdout
            explained = meshctl("explain", "switching", "flower", *target)
            assert "flower version v1 (live -> v1)" in explained.stdout, explained.stdout

            admin.rollout("flower", "v2", canary_percent=20)
            wait_shifted(admin, "flower", "v2")
            canary = mix(300)
            assert set(canary) == {"v1", "v2"}, canary
            assert 0.12 <= canary["v2"] / 300 <= 0.28, f"canary 20 %: {canary}"

            full = admin.rollout("flower", "v2")
            assert (full.serving, full.alias.previous_version) == ("v2", "v1")
            assert mix(50) == {"v2": 50}
            explained = meshctl("explain", "switching", "flower", *target)
            assert "flower version v2 (live -> v2)" in explained.stdout, explained.stdout

            back = admin.rollback("flower")
            assert (back.serving, back.alias.version) == ("v1", "v1")
            assert mix(50) == {"v1": 50}
            # a query may still name a version; live is untouched by it
            assert client.infer("flower", {"x": XS[0]}, version="v2").variant == "v2"


def test_rolling_live_through_a_canary_and_back_loses_no_query(tmp_path: Path) -> None:
    paths = {v: make_mlp(tmp_path / f"{v}.onnx", seed=s) for v, s in (("v1", 1), ("v2", 2))}
    paths["v3"] = make_mlp(tmp_path / "v3.onnx", seed=3)
    expected = {v: [reference_outputs(p, {"x": x})["y"] for x in XS] for v, p in paths.items()}
    assert not np.allclose(expected["v1"][0], expected["v2"][0]), "the versions must differ"
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        mesh.start_node("n1", [cp.address], direct=True)
        mesh.start_node("n2", [cp.address])  # tunnel only
        with AdminClient(cp.address) as admin:
            register_file(admin, "clf", paths["v1"], version="v1", copies=2)
            wait_copies(admin, "clf", 2)
            first = roll_out(admin, "clf", "v1")  # live -> v1 already: the first version
            assert first.serving == "v1" and not first.alias.previous_version
            with QueryLoop(cp.address) as loop:
                time.sleep(0.5)
                t_canary = time.monotonic()  # v2 registered and canaried while it loads
                roll_out(admin, "clf", "v2", paths["v2"], canary_percent=50, copies=2)
                t_canary_on = time.monotonic()
                time.sleep(1.0)
                t_promote = time.monotonic()
                promoted = admin.rollout("clf", "v2")
                t_promoted = time.monotonic()
                assert promoted.serving == "v2", "a warm canary takes over at once"
                assert promoted.alias.previous_version == "v1"
                time.sleep(1.0)
                t_rollback = time.monotonic()
                back = admin.rollback("clf")
                t_rolled_back = time.monotonic()
                assert (back.serving, back.alias.version, back.alias.previous_version) == (
                    "v1",
                    "v1",
                    "",
                )
                time.sleep(1.0)
                # v3 first on no node (a selector nobody carries), so it is surely not warm
                # when live moves to it; then placed for real
                nowhere = {"tier": "nowhere"}
                register_file(admin, "clf", paths["v3"], version="v3", copies=2, selector=nowhere)
                t_v3 = time.monotonic()
                warming = admin.rollout("clf", "v3")  # v3 has no copy yet: v1 serves
                assert (warming.serving, warming.alias.version) == ("v1", "v3"), warming
                assert "warming" in warming.reason
                register_file(admin, "clf", paths["v3"], version="v3", copies=2)
                cli = meshctl("model", "rollout", "clf", "v3", "--timeout", "30", "-t", cp.address)
                t_v3_on = time.monotonic()
                assert cli.returncode == 0, cli.stdout + cli.stderr
                assert "traffic on v3" in cli.stdout and "copies ready" in cli.stdout
                time.sleep(0.5)
            t_end = time.monotonic()

            assert not loop.failures, f"{len(loop.failures)} failed: {loop.failures[:5]}"
            assert len(loop.answers) > 200, f"only {len(loop.answers)} answers"
            for a in loop.answers:  # each answer is the one its version gives
                np.testing.assert_allclose(
                    a.y, expected[a.version][a.input], rtol=1e-5, atol=1e-5, err_msg=a.version
                )
            assert set(loop.between(0, t_canary)) == {"v1"}
            assert set(loop.between(t_canary, t_canary_on)) <= {"v1", "v2"}
            split = loop.between(t_canary_on, t_promote)
            assert split["v1"] and split["v2"], f"canary 50 %: both versions answer ({split})"
            assert 0.25 < split["v2"] / sum(split.values()) < 0.75, split
            assert set(loop.between(t_promoted, t_rollback)) == {"v2"}
            after = loop.between(t_rolled_back, t_v3)
            assert set(after) == {"v1"}, f"after the rollback, v1 at once ({after})"
            moving = loop.between(t_v3, t_v3_on)
            assert moving["v1"] and set(moving) <= {"v1", "v3"}, moving
            assert set(loop.between(t_v3_on, t_end)) == {"v3"}

            kinds = Counter(e.kind for e in admin.list_events(200, model="clf"))
            assert kinds["rollout"] >= 4 and kinds["rollback"] == 1, kinds

            listed = meshctl("model", "aliases", "clf", "-t", cp.address)
            assert listed.returncode == 0, listed.stdout + listed.stderr
            assert "live" in listed.stdout and "v3" in listed.stdout

            # Bad input gets a status a user can act on.
            with pytest.raises(NotFound, match="no version 'v9'"):
                admin.rollout("clf", "v9")
            with pytest.raises(InvalidArgument, match="also a version"):
                admin.rollout("clf", "v2", alias="v1")
            with pytest.raises(InvalidArgument, match="between 0 and 100"):
                admin.rollout("clf", "v2", canary_percent=150)
            with pytest.raises(FailedPrecondition, match="canary"):
                admin.rollout("clf", "v3", canary_percent=10)
            with pytest.raises(FailedPrecondition, match="alias 'live'"):
                admin.remove_model("clf", "v3")
            with pytest.raises(InvalidArgument, match="is an alias"):
                register_file(admin, "clf", paths["v1"], variant="live")
            with pytest.raises(NotFound, match="no alias 'stable'"):
                admin.rollback("clf", alias="stable")
            # A query may name an alias, a version, or a variant (pinned directly).
            roll_out(admin, "clf", "v2", alias="stable")
            with MeshClient(cp.address, timeout=10) as client:
                assert client.infer("clf", {"x": XS[0]}, version="stable").variant == "v2"
                assert client.infer("clf", {"x": XS[0]}, version="v1").variant == "v1"
                assert client.infer("clf", {"x": XS[0]}).variant == "v3"
            assert wait_shifted(admin, "clf", "v3").alias.previous_version == "v1"
