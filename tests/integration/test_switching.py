"""Model switching with real processes: under a bounded burst the gateway moves a model's queries
to its fast variant to keep their latency budget, and back to the accurate one after; switching
chooses among the variants of the version a query resolves to, through a rollout too."""

from __future__ import annotations

import concurrent.futures
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meshserve.client import MeshClient
from meshserve.client._admin import AdminClient
from meshserve.common.errors import FailedPrecondition
from meshserve.devtools.demo_models import make_mlp, sha256_file
from meshserve.devtools.local import LocalMesh
from meshserve.protos import mesh_pb2
from tests.support.mesh import wait_copies
from tests.support.rollout import wait_shifted

X = np.random.default_rng(4).standard_normal((1, 64)).astype(np.float32)
SLO_MS = 40.0  # targets 45 % of it: the accurate variant alone fits, 16 queued on it do not


def _register_family(admin: AdminClient, accurate: Path, fast: Path, **options: Any) -> None:
    """Model "clf": variants "accurate" (0.98) and "fast" (0.90); waits until both are READY."""
    for variant, path, accuracy in (("accurate", accurate, 0.98), ("fast", fast, 0.90)):
        admin.register_model(
            "clf", path.as_uri(), sha256_file(path), variant=variant, accuracy=accuracy, **options
        )
    wait_copies(admin, "clf", 2)  # both variants


def test_a_burst_shifts_the_mix_to_the_fast_variant_and_back(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1", extra=["--telemetry-interval-ms", "300"])
        mesh.start_node("n1", [cp.address])
        accurate = make_mlp(tmp_path / "accurate.onnx", hidden=(3072, 3072))  # ~6 ms a run
        fast = make_mlp(tmp_path / "fast.onnx")  # ~0.05 ms a run
        with AdminClient(cp.address) as admin:
            _register_family(admin, accurate, fast, slo_ms=SLO_MS)
        with MeshClient(cp.address, timeout=10) as client:
            calm = [client.infer("clf", {"x": X}) for _ in range(10)]
            assert {r.variant for r in calm} == {"accurate"}, "no load: the most accurate"
            assert sum(bool(r.slo_met) for r in calm) >= 8, "calm queries meet their budget"

            def burst_worker(_: int) -> list[str]:
                return [client.infer("clf", {"x": X}).variant for _ in range(40)]  # bounded

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                burst = Counter(v for vs in pool.map(burst_worker, range(16)) for v in vs)
            # the calm mix is all accurate; under the burst a good share goes to fast (how
            # much depends on the machine: a busy 2-core one gave 44 % to 70 %)
            assert burst["fast"] >= 0.25 * sum(burst.values()), f"burst mix {dict(burst)}"
            time.sleep(4.0)  # the burst's calibration fades (5 s time constant)
            after = Counter(client.infer("clf", {"x": X}).variant for _ in range(20))
            assert after["accurate"] >= 15, f"after the burst {dict(after)}"
            pinned = client.infer("clf", {"x": X}, version="fast")
            assert pinned.variant == "fast", "an explicit version is never switched"
            with pytest.raises(FailedPrecondition, match="min_accuracy"):
                client.infer("clf", {"x": X}, min_accuracy=0.99)
            strict = client.infer("clf", {"x": X}, slo_ms=1000, min_accuracy=0.95)
            assert strict.variant == "accurate"
        with AdminClient(cp.address) as admin:  # decisions can be inspected
            why = admin.explain_switching("clf")
            assert why.chosen == "accurate" and why.slo_ms == SLO_MS
            predicted = {v.variant: v.predicted_ms for v in why.variants}
            assert 0 < predicted["fast"] < predicted["accurate"]
            assert admin.explain_switching("clf", slo_ms=1).chosen == "fast"
        with AdminClient(cp.address) as admin:  # a variant needing an absent provider
            admin.register_model(
                "clf",
                fast.as_uri(),
                sha256_file(fast),
                variant="gpu",
                accuracy=0.99,
                execution_providers=["CUDAExecutionProvider"],
            )
            time.sleep(1.5)  # a few scheduling passes
            assert [list(p.nodes) for p in admin.list_placements("clf") if p.variant == "gpu"] == [
                []
            ]
            [why] = admin.explain_placement("clf", "gpu")
            assert {n.filtered_by for n in why.nodes} == {"providers"}
        with MeshClient(cp.address, timeout=10) as client:
            assert client.infer("clf", {"x": X}, slo_ms=1000).variant == "accurate"


def test_a_switched_query_gets_the_accurate_variants_cached_answer_first(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        mesh.start_node("n1", [cp.address])
        accurate = make_mlp(tmp_path / "accurate.onnx", hidden=(3072, 3072))
        fast = make_mlp(tmp_path / "fast.onnx")
        with AdminClient(cp.address) as admin:
            _register_family(admin, accurate, fast, serving=mesh_pb2.ServingConfig(cache=True))
        other = np.random.default_rng(5).standard_normal((1, 64)).astype(np.float32)
        with MeshClient(cp.address, timeout=10) as client:
            first = client.infer("clf", {"x": X}, version="accurate")
            assert first.variant == "accurate" and first.parameters["meshserve_cache_hit"] is False
            # A 1 ms budget: the accurate variant (~6 ms) never fits, the query is switched ...
            switched = client.infer("clf", {"x": other}, slo_ms=1)
            assert switched.variant == "fast"
            # ... unless the accurate variant's answer to exactly this input is cached.
            cached = client.infer("clf", {"x": X}, slo_ms=1)
            assert cached.variant == "accurate" and cached.parameters["meshserve_cache_hit"]
            np.testing.assert_array_equal(cached["y"], first["y"])


def test_switching_chooses_inside_the_version_live_points_at_through_a_rollout(
    tmp_path: Path,
) -> None:
    """Versions v1 and v2 of "clf", each with an accurate (~6 ms) and a fast variant: a query
    under a budget no accurate variant meets gets the fast variant of the version it resolves to
    (live: v1), during a canary of v2 the fast variant of whichever version it drew, after the
    rollout v2's; explain names the version and its variants only."""
    with LocalMesh(tmp_path, lease_ttl_s=3) as mesh:
        mesh.start_etcd()
        cp = mesh.start_controlplane("cp-1")
        mesh.start_node("n1", [cp.address])
        with AdminClient(cp.address) as admin:
            for version, seed in (("v1", 1), ("v2", 2)):
                accurate = make_mlp(tmp_path / f"{version}.onnx", hidden=(3072, 3072), seed=seed)
                fast = make_mlp(tmp_path / f"{version}-fast.onnx", seed=seed)
                for variant, path, accuracy in (
                    (version, accurate, 0.98),
                    (f"{version}-fast", fast, 0.9),
                ):
                    admin.register_model(
                        "clf", path.as_uri(), sha256_file(path), version=version,
                        variant=variant, accuracy=accuracy,
                    )  # fmt: skip
            wait_copies(admin, "clf", 4)
            why = admin.explain_switching("clf", slo_ms=1)
            assert (why.version, why.route, why.chosen) == ("v1", "live -> v1", "v1-fast")
            assert [v.variant for v in why.variants] == ["v1", "v1-fast"]
        with MeshClient(cp.address, timeout=10) as client:

            def mix(n: int, **options: Any) -> Counter[str]:
                return Counter(client.infer("clf", {"x": X}, **options).variant for _ in range(n))

            assert mix(10, slo_ms=1) == {"v1-fast": 10}, "switched inside live's version"
            assert mix(5) == {"v1": 5}, "no budget: the version's most accurate variant"
            with AdminClient(cp.address) as admin:
                admin.rollout("clf", "v2", canary_percent=50)
                wait_shifted(admin, "clf", "v2")
            during = mix(60, slo_ms=1)
            assert set(during) == {"v1-fast", "v2-fast"}, f"each version switches: {during}"
            with AdminClient(cp.address) as admin:
                admin.rollout("clf", "v2")
                why = admin.explain_switching("clf", slo_ms=1)
                assert (why.version, why.chosen) == ("v2", "v2-fast")
            assert mix(10, slo_ms=1) == {"v2-fast": 10}
            assert mix(5) == {"v2": 5}
            assert mix(3, slo_ms=1, version="v1") == {"v1-fast": 3}, "a named version switches too"
