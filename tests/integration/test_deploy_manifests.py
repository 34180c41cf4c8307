"""deploy/ checked offline: no container runtime or cluster runs here, so every deployment file is
checked against the schemas and parsers that would judge it in production.

- Kubernetes: each overlay is rendered (kustomize: ``kubectl kustomize`` where kubectl is
  installed, and always :func:`render`, a loader of the kustomize subset the overlays use,
  which must agree with kubectl), and every object validates against the Kubernetes 1.32
  OpenAPI schemas shipped by ``kubernetes-validate`` (strict: unknown fields fail). The
  ServiceMonitor is a CRD with no schema offline: its apiVersion, kind and the fields the
  Prometheus Operator requires are checked by hand.
- Compose: ``deploy/compose/compose.yaml`` validates against the Compose Specification's JSON
  schema (vendored: deploy/compose/schema/).
- Every command line (containers, init containers, jobs, compose services, the Dockerfile's CMD,
  the systemd unit's ExecStart with node.env.example's values) goes through the real argument
  parser of its program, and each ``--flag`` must be one of that parser's own option strings
  (argparse would accept an abbreviation): a renamed flag fails here. etcd's flags are checked
  against ``etcd --help`` of the etcd binary the suite runs.
- Consistency the schemas cannot see: ports named by flags, probes and containerPorts agree;
  every file a flag names lies in a mounted volume, and in a Secret's keys when the volume is a
  Secret; Secrets are files (mode 0400/0440), never environment variables; TLS is on for every
  mesh process of an overlay or for none.
- Run for real, on loopback (addresses moved there, container paths to a temporary folder laid
  out as the volumes would be; flags, file names and the init containers' work as written):
  etcd with the StatefulSet's flags on ``etcd-certs.sh``'s certificates, reached by the control
  plane's etcd link; each overlay's control plane, gateway and DaemonSet node, whose readiness
  probes pass, whose node joins, and whose policy Job applies the policy; compose's services
  with their healthchecks.
"""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
OVERLAYS = ("dev", "production")
K8S_VERSION = "1.32.0"
PLACEHOLDER = b"placeholder: secret material is never committed\n"

# -- a loader of the kustomize subset the overlays use ----------------------------------------
# Supported: resources (files, or directories holding a kustomization.yaml), namespace, labels
# (pairs, metadata only), images (newName/newTag), patches (path: strategic-merge patches naming
# their target by apiVersion/kind/metadata.name), secretGenerator and configMapGenerator (files:
# KEY=PATH or PATH) with generatorOptions.disableNameSuffixHash: true. Anything else is refused,
# so a kustomization using more fails here rather than rendering wrong. A secretGenerator file
# that does not exist (secrets are never committed) becomes PLACEHOLDER.

_KNOWN = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "patches",
    "secretGenerator",
    "configMapGenerator",
    "generatorOptions",
}
_CLUSTER_SCOPED = {"Namespace"}
# Strategic merge: lists of maps merged by key (the Kubernetes patchMergeKey); others replace.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def _merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    key = _MERGE_KEYS.get(field)
    if key and isinstance(base, list) and isinstance(patch, list):
        # as kubectl: items new to the list first (in the patch's order), then the base's
        out_list = [copy.deepcopy(x) for x in base]
        added = []
        for item in patch:
            at = [i for i, x in enumerate(out_list) if x.get(key) == item.get(key)]
            if at:
                out_list[at[0]] = _merge(out_list[at[0]], item, "")
            else:
                added.append(copy.deepcopy(item))
        return added + out_list
    return copy.deepcopy(patch)


def _ident(doc: dict[str, Any]) -> tuple[str, str, str]:
    return (doc["apiVersion"].split("/")[0], doc["kind"], doc["metadata"]["name"])


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` prints, for the supported subset."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - _KNOWN
    assert not unknown, f"{directory}: the test's loader does not support {sorted(unknown)}"
    docs: list[dict[str, Any]] = []
    for res in spec.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for entry in spec.get("patches", []):
        assert set(entry) == {"path"}, f"unsupported patch entry {entry}"
        for patch in yaml.safe_load_all((directory / entry["path"]).read_text()):
            hits = [i for i, d in enumerate(docs) if _ident(d) == _ident(patch)]
            assert len(hits) == 1, f"patch target {_ident(patch)} not found once"
            docs[hits[0]] = _merge(docs[hits[0]], patch)
    for image in spec.get("images", []):
        for doc in docs:
            for c in _containers(doc):
                name, _, _tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    options = spec.get("generatorOptions", {})
    if spec.get("secretGenerator") or spec.get("configMapGenerator"):
        assert options.get("disableNameSuffixHash") is True, "hashed names are not supported"
    for gen in spec.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files"}, f"unsupported configMapGenerator {gen}"
        files = _generator_files(directory, gen)
        data = {k: src.read_text() for k, src in files.items()}
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
                "data": data,
            }
        )
    for gen in spec.get("secretGenerator", []):
        assert set(gen) <= {"name", "files"}, f"unsupported secretGenerator {gen}"
        files = _generator_files(directory, gen)
        data = {
            k: base64.b64encode(src.read_bytes() if src.exists() else PLACEHOLDER).decode()
            for k, src in files.items()
        }
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": gen["name"]},
                "type": "Opaque",
                "data": data,
            }
        )
    for group in spec.get("labels", []):
        assert set(group) == {"pairs"}, f"unsupported labels entry {group}"
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(group["pairs"])
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in _CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
    return docs


def _generator_files(directory: Path, gen: dict[str, Any]) -> dict[str, Path]:
    out = {}
    for item in gen["files"]:
        key, sep, rel = item.partition("=")
        rel = rel if sep else key
        out[key if sep else Path(rel).name] = directory / rel
    return out


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    return None


def _containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    pod = _pod_spec(doc)
    if pod is not None:
        yield from pod.get("initContainers", [])
        yield from pod["containers"]


def _key(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _with_placeholder_secrets(tmp: Path) -> Path:
    """A copy of deploy/kubernetes whose overlays' secret files exist (kubectl needs them)."""
    tree = tmp / "kubernetes"
    shutil.copytree(KUBE, tree)
    for overlay in OVERLAYS:
        spec = yaml.safe_load((tree / "overlays" / overlay / "kustomization.yaml").read_text())
        for gen in spec.get("secretGenerator", []):
            for item in gen["files"]:
                path = tree / "overlays" / overlay / item.rpartition("=")[2]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(PLACEHOLDER)
    return tree


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(KUBE / "overlays" / request.param)


# -- the command lines' parsers ---------------------------------------------------------------


def _argparse_parser(module: str) -> argparse.ArgumentParser:
    import importlib

    parser: argparse.ArgumentParser = importlib.import_module(module)._parser()
    return parser


def _check_argparse(module: str, argv: list[str]) -> argparse.Namespace:
    parser = _argparse_parser(module)
    known = set(parser._option_string_actions)
    for token in argv:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in known, f"{parser.prog}: no option {flag} (argv {argv})"
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports on stderr and exits 2
        raise AssertionError(f"{parser.prog} refuses {argv}") from exc


def _check_meshctl(argv: list[str]) -> None:
    from meshserve.client.cli.app import build

    # typer carries its own click: a group is what resolves subcommands. Options are matched
    # exactly (click has no abbreviations); a bad one raises a UsageError.
    cmd: Any = typer.main.get_command(build())
    ctx = cmd.make_context("meshctl", list(argv))
    path = ["meshctl"]
    while hasattr(cmd, "resolve_command"):
        rest = [*ctx._protected_args, *ctx.args]
        assert rest, f"meshctl {argv}: no subcommand"
        name, sub, rest = cmd.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        path.append(name)
        cmd = sub
        ctx = cmd.make_context(name, rest, parent=ctx)
    assert path[1:] == ["policy", "apply"], path  # the one meshctl call the manifests make


@functools.cache
def _etcd_flags(binary: str) -> frozenset[str]:
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]+)", out.stdout + out.stderr))


def _check_etcd(argv: list[str]) -> None:
    etcd = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if etcd is None:
        return  # the suite's own etcd is missing: the other tests say so
    for token in argv:
        if token.startswith("--"):
            assert token.split("=", 1)[0] in _etcd_flags(etcd), f"etcd has no flag {token}"


ISSUER = KUBE / "overlays" / "production" / "issue-pod-cert.py"


def _issuer_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("issue_pod_cert", ISSUER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_python(argv: list[str]) -> Any:
    if argv[1] == "-c":  # a probe: it must at least compile
        compile(argv[2], "<probe>", "exec")
        return None
    assert Path(argv[1]).name == ISSUER.name, argv  # the one script the manifests run
    parser: argparse.ArgumentParser = _issuer_module().build_parser()
    known = set(parser._option_string_actions)
    for token in argv[2:]:
        assert token.split("=", 1)[0] in known, f"{ISSUER.name}: no option {token}"
    return parser.parse_args(argv[2:])


def _check_sh(argv: list[str]) -> None:
    assert argv[1] == "-c" and len(argv) == 3, argv
    # the init container's copy: plain coreutils, checked for shape only
    assert re.fullmatch(r"cp [^;&|]+ && chmod 0400 [^;&|]+", argv[2]), argv[2]


CHECKERS: dict[str, Callable[[list[str]], Any]] = {
    "meshserve-controlplane": lambda a: _check_argparse("meshserve.controlplane.__main__", a[1:]),
    "meshserve-node": lambda a: _check_argparse("meshserve.node.__main__", a[1:]),
    "meshserve-gateway": lambda a: _check_argparse(
        "meshserve.controlplane.dataplane.standalone", a[1:]
    ),
    "meshctl": lambda a: _check_meshctl(a[1:]),
    "etcd": _check_etcd,
    "python": _check_python,
    "sh": _check_sh,
}


def check_command(argv: list[str]) -> str:
    """Parse argv with its program's parser; returns the program's name."""
    program = Path(argv[0]).name
    assert program in CHECKERS, f"no parser known for {argv[0]}"
    CHECKERS[program](argv)
    return program


EXAMPLE_FIELDS = {
    "metadata.name": "meshserve-node-pool-7d9f8c6b5-x2k4q",
    "metadata.namespace": "meshserve",
    "spec.nodeName": "worker-3",
    "status.podIP": "10.42.3.17",
}


def _container_argv(c: dict[str, Any], fields: dict[str, str] | None = None) -> list[str]:
    """command + args with $(VAR) expanded from the container's env (example values, or
    ``fields`` for the downward API's)."""
    fields = {**EXAMPLE_FIELDS, **(fields or {})}
    env = {}
    for e in c.get("env", []):
        assert "secretKeyRef" not in e.get("valueFrom", {}), f"{c['name']}: a secret in env"
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
    argv = [*c.get("command", []), *c.get("args", [])]

    def expand(s: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], s)

    return [expand(str(a)) for a in argv]


# -- Kubernetes -------------------------------------------------------------------------------


def test_kubectl_kustomize_renders_what_the_test_loader_renders(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the loader alone renders the overlays")
    tree = _with_placeholder_secrets(tmp_path)
    for name in OVERLAYS:
        out = subprocess.run(
            [kubectl, "kustomize", str(tree / "overlays" / name)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        theirs = sorted((d for d in yaml.safe_load_all(out) if d), key=_key)
        ours = sorted(render(tree / "overlays" / name), key=_key)
        assert [_key(d) for d in ours] == [_key(d) for d in theirs]
        for a, b in zip(ours, theirs, strict=True):
            assert a == b, f"{name} {_key(a)}: the loader differs from kubectl kustomize"


def test_every_object_validates_against_the_kubernetes_schemas(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _name, docs = overlay
    for doc in docs:  # everything lands in one namespace, generated Secrets included
        expected = None if doc["kind"] == "Namespace" else "meshserve"
        assert doc["metadata"].get("namespace") == expected, _key(doc)
    kinds = {d["kind"] for d in docs}
    assert {
        "StatefulSet",
        "Deployment",
        "DaemonSet",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ConfigMap",
        "Secret",
        "Service",
        "ServiceMonitor",
    } <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked by the next test
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{_key(doc)}: {exc.message} at {list(exc.path)}") from exc


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _is_health_check(probe: dict[str, Any]) -> bool:
    """A ``grpc:`` probe, or an exec probe running a ``grpc.health.v1`` Check (TLS)."""
    if "grpc" in probe:
        return True
    command = probe.get("exec", {}).get("command", [])
    return command[:2] == ["python", "-c"] and "HealthStub" in command[2] and "Check(" in command[2]


def test_the_workloads_have_the_shape_the_issue_asks(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    """Issue 17 item 7: etcd a 3-member StatefulSet with TLS (clients and peers), the control
    plane a Deployment of 2+ replicas, the gateway a Deployment the HPA owns, nodes as a
    DaemonSet and a Deployment, a PodDisruptionBudget for every Deployment and StatefulSet,
    a Service for every component, gRPC health probes on every mesh container, the policy in a
    ConfigMap and every token and key in a Secret."""
    name, docs = overlay
    by = {_key(d): d for d in docs}
    etcd = by["StatefulSet/etcd"]
    assert etcd["spec"]["replicas"] == 3
    (etcd_c,) = etcd["spec"]["template"]["spec"]["containers"]
    flags = dict(a.removeprefix("--").partition("=")[::2] for a in etcd_c["command"][1:])
    for flag in ("listen-client-urls", "advertise-client-urls", "listen-peer-urls"):
        assert flags[flag].startswith("https://"), flag
    assert flags["initial-cluster"].count("=https://") == 3
    assert "client-cert-auth" in flags and "peer-client-cert-auth" in flags
    for flag in ("trusted-ca-file", "cert-file", "key-file", "peer-cert-file", "peer-key-file"):
        assert flags[flag], flag
    assert by["Deployment/meshserve-controlplane"]["spec"]["replicas"] >= 2
    gateway = by["Deployment/meshserve-gateway"]
    assert "replicas" not in gateway["spec"]  # the HPA owns it
    hpa = by["HorizontalPodAutoscaler/meshserve-gateway"]["spec"]
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "meshserve-gateway"}
    assert hpa["scaleTargetRef"] == target
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"], name
    assert "DaemonSet/meshserve-node" in by and "Deployment/meshserve-node-pool" in by
    budgets = [
        d["spec"]["selector"]["matchLabels"] for d in docs if d["kind"] == "PodDisruptionBudget"
    ]
    services = [d["spec"]["selector"] for d in docs if d["kind"] == "Service"]
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
            continue
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert any(_matches(s, labels) for s in services), f"{_key(doc)}: no Service"
        if doc["kind"] != "DaemonSet":  # a drain evicts no DaemonSet pod
            covering = [b for b in budgets if _matches(b, labels)]
            assert len(covering) == 1, f"{_key(doc)}: {len(covering)} PodDisruptionBudgets"
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if Path(_container_argv(c)[0]).name.startswith("meshserve-"):
                for probe in ("readinessProbe", "livenessProbe"):
                    assert _is_health_check(c[probe]), (_key(doc), probe)
    assert "ConfigMap/meshserve-policy" in by
    assert {
        "Secret/meshserve-etcd-tls",
        "Secret/meshserve-controlplane",
        "Secret/meshserve-node",
    } <= set(by)


def test_the_service_monitor_has_what_the_prometheus_operator_requires(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    """No CRD schema offline: apiVersion, kind and the required fields, checked by hand."""
    _name, docs = overlay
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1
    mon = monitors[0]
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(mon) == {"apiVersion", "kind", "metadata", "spec"}
    spec = mon["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    selected = set(spec["selector"]["matchExpressions"][0]["values"])
    assert spec["endpoints"] and all(e["port"] == "metrics" for e in spec["endpoints"])
    # every selected Service has a port named metrics, and every component is selected
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert selected == set(services)
    for name in selected:
        assert "metrics" in {p["name"] for p in services[name]["spec"]["ports"]}, name


def test_every_command_line_parses_with_its_programs_parser(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = overlay
    seen: dict[str, int] = {}
    for doc in docs:
        for c in _containers(doc):
            program = check_command(_container_argv(c))
            seen[program] = seen.get(program, 0) + 1
            for probe in ("readinessProbe", "livenessProbe"):
                if "exec" in c.get(probe, {}):
                    check_command(c[probe]["exec"]["command"])
    expected = {
        "meshserve-controlplane": 1,
        "meshserve-gateway": 1,
        "meshserve-node": 2,
        "meshctl": 1,
        "etcd": 1,
        "sh": 1,
    }
    if name == "production":
        expected["python"] = 3  # each replica and node issues its certificate at start
    assert seen == expected


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_ports_flags_probes_and_services_agree(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _name, docs = overlay
    for doc in docs:
        for c in _containers(doc):
            argv = _container_argv(c)
            program = Path(argv[0]).name
            if not program.startswith("meshserve-"):
                continue
            ns = CHECKERS[program](argv)
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert _port_of(ns.listen) == ports["grpc"], _key(doc)
            assert ns.metrics_listen.startswith("0.0.0.0:"), _key(doc)  # scraped from outside
            assert _port_of(ns.metrics_listen) == ports["metrics"], _key(doc)
            for probe in ("readinessProbe", "livenessProbe"):
                if "exec" in c[probe]:  # TLS: python -c CODE localhost:PORT CA CERT KEY
                    assert "grpc" not in c[probe]
                    dialled = c[probe]["exec"]["command"][3]
                    assert dialled == f"localhost:{ports['grpc']}", (_key(doc), probe)
                    assert (ns.tls_cert != "") is True, "an exec probe without TLS"
                else:
                    assert c[probe]["grpc"]["port"] == ports["grpc"], (_key(doc), probe)
                    assert ns.tls_cert == "", "kubelet's grpc: probe cannot speak TLS"
            if program == "meshserve-node":
                assert _port_of(ns.advertise) == ports["grpc"]
    # the network policies open exactly the ports the workloads listen on
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"]["spec"]["podSelector"] == {}
    etcd_rules = policies["etcd"]["spec"]["ingress"]
    client = [r for r in etcd_rules if r["ports"] == [{"port": 2379}]]
    only_replicas = {"matchLabels": {"app.kubernetes.io/name": "meshserve-controlplane"}}
    assert client == [{"from": [{"podSelector": only_replicas}], "ports": [{"port": 2379}]}]
    node_rules = policies["meshserve-node"]["spec"]["ingress"]
    assert {"port": 9001} in node_rules[0]["ports"] and "from" in node_rules[0]


def test_tls_is_all_or_nothing_and_nodes_join_accordingly(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    """Every mesh process has TLS or none has; a node sends its join token in the clear to a
    non-loopback control plane only with --insecure-join, so a plaintext overlay needs it and
    a TLS one must not carry it (the live test dials loopback, where it is never needed)."""
    name, docs = overlay
    parsed = []
    for doc in docs:
        for c in _containers(doc):
            argv = _container_argv(c)
            if Path(argv[0]).name.startswith("meshserve-"):
                parsed.append((Path(argv[0]).name, CHECKERS[Path(argv[0]).name](argv)))
    with_tls = {bool(ns.tls_cert) for _program, ns in parsed}
    assert with_tls == {name == "production"}, name
    for program, ns in parsed:
        if program == "meshserve-node":
            assert ns.insecure_join is (name != "production")
            assert ns.join_token_file


def test_secrets_are_files_with_owner_and_group_modes_and_cover_every_flag(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _name, docs = overlay
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for doc in docs:
        pod = _pod_spec(doc)
        if pod is None:
            continue
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for claim in doc["spec"].get("volumeClaimTemplates", []):
            volumes[claim["metadata"]["name"]] = {"persistentVolumeClaim": claim}
        for v in volumes.values():
            if "secret" in v:
                assert v["secret"].get("defaultMode") in (0o400, 0o440), (_key(doc), v)
                assert v["secret"]["secretName"] in secrets, (_key(doc), v)
        for c in _containers(doc):
            assert "envFrom" not in c
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
            for token in _container_argv(c)[1:]:
                value = token.split("=", 1)[1] if token.startswith("--") and "=" in token else ""
                if not value.startswith(("/etc/", "/run/")):
                    continue
                if value in mounts:  # a directory (the issuer's --out)
                    continue
                parent = str(Path(value).parent)
                assert parent in mounts, f"{_key(doc)}: {value} is in no mounted volume"
                volume = mounts[parent]
                if "secret" in volume:
                    keys = set(secrets[volume["secret"]["secretName"]]["data"])
                    assert Path(value).name in keys, f"{_key(doc)}: {value} not in the Secret"


def test_the_policy_config_map_is_the_shipped_policy_and_parses() -> None:
    from meshserve.common.policy.config import parse_policy

    docs = render(KUBE / "overlays" / "production")
    (cm,) = [d for d in docs if _key(d) == "ConfigMap/meshserve-policy"]
    text = cm["data"]["policy.yaml"]
    assert text == (DEPLOY / "policies" / "spread-across-zones.yaml").read_text()
    assert parse_policy(text).name == "spread-across-zones"


# -- compose, Dockerfile, systemd -------------------------------------------------------------


def test_the_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads((DEPLOY / "compose" / "schema" / "compose-spec.json").read_text())
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    jsonschema.validate(compose, schema, cls=jsonschema.Draft7Validator)
    assert {"etcd", "controlplane", "gateway", "node-1", "node-2"} == set(compose["services"])
    seen = []
    for name, service in compose["services"].items():
        seen.append(check_command(service["command"]))
        test = service.get("healthcheck", {}).get("test")
        if test and test[1] == "python":
            check_command(test[1:])
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert sorted(seen) == sorted(
        ["etcd", "meshserve-controlplane", "meshserve-gateway", "meshserve-node", "meshserve-node"]
    )


def _dockerfile_json(instruction: str) -> list[list[str]]:
    text = (ROOT / "Dockerfile").read_text()
    return [json.loads(m) for m in re.findall(rf"^{instruction} (\[.*\])$", text, re.M)]


def test_the_dockerfile_is_multi_stage_slim_non_root_and_its_command_parses() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)
    assert len(stages) >= 2 and stages[-1][0] == "python:3.11-slim", stages
    final = text[text.rindex("\nFROM ") :]
    users = re.findall(r"^USER (\S+)$", final, re.M)
    assert users and not users[-1].startswith(("0", "root")), users
    assert not re.search(r"apt-get|gcc|build-essential", final), "build tools in the final image"
    cmds = _dockerfile_json("CMD") + _dockerfile_json("ENTRYPOINT")
    assert cmds, "no CMD/ENTRYPOINT in exec form"
    for argv in cmds:
        check_command(argv)
    # the build stage copies what the wheel is made of: meshserve/ and every folder it links to
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    copied = {src for sources in copies for src in sources if not src.startswith("--")}
    linked = {p.readlink().name for p in (ROOT / "meshserve").iterdir() if p.is_symlink()}
    assert linked and linked | {"meshserve", "pyproject.toml"} <= copied, copied
    # .dockerignore shuts everything out, then lets in exactly what is copied
    ignored = [
        line for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] not in "#"
    ]
    assert ignored[0] == "*"
    assert {line[1:].rstrip("/") for line in ignored if line.startswith("!")} == copied


def _systemd_argv(exec_start: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart expansion: ${VAR} is one argument's text, a bare $VAR word splits
    at whitespace into zero or more arguments."""
    out: list[str] = []
    for word in shlex.split(exec_start):
        bare = re.fullmatch(r"\$(\w+)", word)
        if bare:
            out.extend(env.get(bare.group(1), "").split())
        else:
            out.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return out


def test_the_systemd_units_exec_start_parses_with_the_example_environment() -> None:
    env = {}
    for line in (DEPLOY / "systemd" / "node.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert units
    for unit in units:
        starts = [
            line.split("=", 1)[1]
            for line in unit.read_text().splitlines()
            if line.startswith("ExecStart=")
        ]
        assert starts, unit
        for start in starts:
            argv = _systemd_argv(start, env)
            assert check_command(argv) == "meshserve-node"
            assert "--node-id" in argv  # MESHSERVE_EXTRA_ARGS split into its words


# -- run for real: etcd, a control plane and a node with the manifests' own flags ---------------
# Addresses move to loopback and container paths to a temporary folder laid out as the volumes
# would be; everything else (flags, file names, the init containers' work) is the manifests'.


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _secret_dir(target: Path, overlay_dir: Path, name: str, files_dir: Path) -> Path:
    """What kubelet mounts for Secret ``name`` of the overlay (mode 0440), its files taken from
    ``files_dir`` (by base name) standing in for the overlay's secrets/ folder."""
    spec = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())
    (gen,) = [g for g in spec["secretGenerator"] if g["name"] == name]
    target.mkdir(parents=True)
    for key, src in _generator_files(overlay_dir, gen).items():
        (target / key).write_bytes((files_dir / src.name).read_bytes())
        (target / key).chmod(0o440)
    return target


def _moved(arg: str, moves: dict[str, str]) -> str:
    for old, new in moves.items():
        arg = arg.replace(old, new)
    return arg


def _wait(check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    import time

    deadline = time.monotonic() + 20.0
    for _ in range(200):  # bounded in count and in time (20 s)
        if check():
            return
        assert proc.poll() is None, f"{what}: the process exited ({proc.returncode})"
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise AssertionError(f"{what}: not ready in 20 s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def manifest_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """deploy/kubernetes/etcd-certs.sh's files, in the Secrets the overlays generate, running
    etcd with the StatefulSet's flags; and the control plane's init container's copy of its
    etcd client files. Yields the path and address moves for the control plane's flags."""
    import urllib.request

    etcd_bin = shutil.which("etcd") or "/usr/bin/etcd"
    if not Path(etcd_bin).exists() or shutil.which("openssl") is None:
        pytest.skip("needs etcd and openssl")
    tmp = tmp_path_factory.mktemp("etcd")
    files = tmp / "made"
    subprocess.run(
        ["bash", str(KUBE / "etcd-certs.sh"), str(files)], check=True, capture_output=True
    )
    prod = KUBE / "overlays" / "production"
    tls = _secret_dir(tmp / "etcd-tls", prod, "meshserve-etcd-tls", files)
    secret = _secret_dir(tmp / "etcd-secret", prod, "meshserve-etcd-client", files)
    run_dir = tmp / "run-etcd"
    run_dir.mkdir()
    docs = {_key(d): d for d in render(prod)}
    client, peer, metrics = _free_port(), _free_port(), _free_port()
    moves = {
        "/etc/etcd/tls": str(tls),
        "/var/lib/etcd": str(tmp / "etcd-data"),
        "https://0.0.0.0:2379": f"https://127.0.0.1:{client}",
        "https://0.0.0.0:2380": f"https://127.0.0.1:{peer}",
        "http://0.0.0.0:2381": f"http://127.0.0.1:{metrics}",
        "etcd-0.etcd.meshserve.svc:2379": f"localhost:{client}",
        "etcd-0.etcd.meshserve.svc:2380": f"localhost:{peer}",
        "/etc/meshserve/etcd-secret": str(secret),
        "/run/meshserve/etcd": str(run_dir),
    }
    (etcd_c,) = docs["StatefulSet/etcd"]["spec"]["template"]["spec"]["containers"]
    argv = [_moved(a, moves) for a in _container_argv(etcd_c, {"metadata.name": "etcd-0"})]
    argv = [
        f"--initial-cluster=etcd-0=https://localhost:{peer}"
        if a.startswith("--initial-cluster=")
        else a
        for a in argv
    ]
    log = (tmp / "etcd.log").open("wb")
    proc = subprocess.Popen([etcd_bin, *argv[1:]], stdout=log, stderr=subprocess.STDOUT)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/health", timeout=1) as r:
                return b"true" in r.read()
        except OSError:
            return False

    try:
        _wait(healthy, "etcd", proc)
        pod = docs["Deployment/meshserve-controlplane"]["spec"]["template"]["spec"]
        (copy_init,) = [c for c in pod["initContainers"] if c["name"] == "etcd-key"]
        subprocess.run([_moved(a, moves) for a in _container_argv(copy_init)], check=True)
        yield {
            "/run/meshserve/etcd": str(run_dir),
            # the three members' URLs, as the one member on loopback
            "https://etcd-0.etcd.meshserve.svc:2379,https://etcd-1.etcd.meshserve.svc:2379,"
            "https://etcd-2.etcd.meshserve.svc:2379": f"https://localhost:{client}",
        }
    finally:
        _stop(proc)
        log.close()


async def _write_and_read(url: str, auth: Any) -> bytes:
    from meshserve.controlplane.etcd.link import open_client, parse_endpoints

    etcd = open_client(parse_endpoints(url), auth, timeout=5.0, options={})
    await etcd.connect()
    try:
        await etcd.put(b"/meshserve/deploy-check", b"ok")
        got = await etcd.get(b"/meshserve/deploy-check")
        assert got is not None
        value: bytes = got.value
        return value
    finally:
        await etcd.close()


def test_etcd_certs_script_statefulset_flags_and_controlplane_link_work_together(
    manifest_etcd: dict[str, str],
) -> None:
    """The init container's copy is 0400, and the control plane's etcd link (its Deployment's
    flags) writes and reads etcd over mutual TLS."""
    import asyncio
    import os

    from meshserve.controlplane.etcd.link import auth_from_args

    run_dir = Path(manifest_etcd["/run/meshserve/etcd"])
    assert {os.stat(p).st_mode & 0o777 for p in run_dir.iterdir()} == {0o400}
    for overlay in OVERLAYS:
        docs = {_key(d): d for d in render(KUBE / "overlays" / overlay)}
        pod = docs["Deployment/meshserve-controlplane"]["spec"]["template"]["spec"]
        (cp,) = pod["containers"]
        argv = [_moved(a, manifest_etcd) for a in _container_argv(cp)]
        ns = _check_argparse("meshserve.controlplane.__main__", argv[1:])
        url, auth = auth_from_args(ns)
        assert url.startswith("https://localhost:")
        assert auth is not None and auth.tls is not None and auth.tls.key is not None
        assert asyncio.run(_write_and_read(url, auth)) == b"ok"


def _grpc_health(address: str) -> bool:
    """What kubelet's grpc: probe does: Health.Check over plaintext, SERVING or not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_overlay_runs_its_probes_pass_a_node_joins_and_the_policy_job_applies(
    manifest_etcd: dict[str, str], tmp_path: Path, overlay_name: str
) -> None:
    """Each overlay for real, on loopback: a control plane, a standalone gateway and a DaemonSet
    node started with their flags; their readiness probes pass (dev: grpc.health.v1 in
    plaintext, as kubelet's grpc: probe asks; production: the exec probe, health over mutual
    TLS); the node joins (production: with the certificate its init container issued from
    meshctl certs init's node CA, CN = node id, --tls-client-auth required); the policy Job's
    meshctl command applies the ConfigMap's policy."""
    import secrets
    import sys

    from meshserve.client._admin import AdminClient
    from meshserve.common.security import TLSFiles
    from meshserve.devtools.certs import init_certs

    overlay_dir = KUBE / "overlays" / overlay_name
    production = overlay_name == "production"
    docs = {_key(d): d for d in render(overlay_dir)}
    made = tmp_path / "made"
    init_certs(made)  # what production's secrets/pki holds (dev ignores it)
    for token in ("join.token", "admin.token"):
        (made / token).write_text(secrets.token_urlsafe(32) + "\n")

    def secret_dir(name: str, where: str) -> str:
        return str(_secret_dir(tmp_path / where, overlay_dir, name, made))

    mounts = {"/etc/meshserve/policy": str(tmp_path / "policy")}
    if production:
        mounts["/etc/meshserve/pki"] = secret_dir("meshserve-pki", "pki")
        mounts["/etc/meshserve/client"] = secret_dir("meshserve-client-tls", "client")
    ports = {8001: _free_port(), 8002: _free_port(), 9001: _free_port()}
    addresses = {
        "/opt/meshserve/issue/issue-pod-cert.py": str(ISSUER),
        "meshserve-controlplane:8001": f"127.0.0.1:{ports[8001]}",
    }
    for port, moved_to in ports.items():
        for host in ("0.0.0.0", "127.0.0.1", "localhost"):
            addresses[f"{host}:{port}"] = f"{host.replace('0.0.0.0', '127.0.0.1')}:{moved_to}"
    fields = {"status.podIP": "127.0.0.1", "spec.nodeName": "worker-3"}
    bin_dir = Path(sys.executable).parent
    procs: list[subprocess.Popen[bytes]] = []

    def start(kind_name: str, name: str, **secret_mounts: str) -> Callable[[], bool]:
        """Start the pod's init containers and its process; returns its readiness probe."""
        pod = docs[kind_name]["spec"]["template"]["spec"]
        where = {
            **manifest_etcd,
            **mounts,
            **{
                path: secret_dir(secret, f"{name}-{secret}")
                for path, secret in secret_mounts.items()
            },
            "/run/meshserve/tls": str(tmp_path / f"{name}-tls"),
            "/var/cache/meshserve": str(tmp_path / f"{name}-cache"),
            "0.0.0.0:9090": f"127.0.0.1:{_free_port()}",
            **addresses,
        }
        for init in pod.get("initContainers", []):
            if init["name"] == "issue-cert":
                argv = [_moved(a, where) for a in _container_argv(init, fields)]
                subprocess.run([sys.executable, *argv[1:]], check=True)
        (main,) = pod["containers"]
        argv = [_moved(a, where) for a in _container_argv(main, fields)]
        log = (tmp_path / f"{name}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [str(bin_dir / argv[0]), *argv[1:]], stdout=log, stderr=subprocess.STDOUT
            )
        )
        probe = main["readinessProbe"]
        if "exec" in probe:
            command = [_moved(a, where) for a in probe["exec"]["command"]]
            return lambda: (
                subprocess.run(
                    [sys.executable, *command[1:]], capture_output=True, timeout=10
                ).returncode
                == 0
            )
        return lambda: _grpc_health(f"127.0.0.1:{ports[probe['grpc']['port']]}")

    prefix = "/etc/meshserve"
    try:
        cp_ready = start(
            "Deployment/meshserve-controlplane",
            "cp",
            **{f"{prefix}/secrets": "meshserve-controlplane"},
            **({f"{prefix}/ca": "meshserve-controlplane-ca"} if production else {}),
        )
        _wait(cp_ready, "the control plane's readiness probe", procs[-1])
        node_ready = start(
            "DaemonSet/meshserve-node",
            "node",
            **{f"{prefix}/secrets": "meshserve-node"},
            **({f"{prefix}/ca": "meshserve-node-ca"} if production else {}),
        )
        gw_ready = start(
            "Deployment/meshserve-gateway",
            "gw",
            **({f"{prefix}/gateway-tls": "meshserve-gateway-tls"} if production else {}),
        )
        _wait(node_ready, "the node's readiness probe", procs[1])
        _wait(gw_ready, "the gateway's readiness probe", procs[2])
        tls = (
            TLSFiles.from_options(
                made / "controlplane-ca.crt", made / "client.crt", made / "client.key"
            )
            if production
            else None
        )
        admin_token = (made / "admin.token").read_text().strip()
        with AdminClient(f"127.0.0.1:{ports[8001]}", tls=tls, token=admin_token) as admin:
            _wait(
                lambda: "worker-3" in {n.node_id for n in admin.list_nodes()},
                "the node joining",
                procs[1],
            )
        # the policy Job, as it runs
        Path(mounts["/etc/meshserve/policy"]).mkdir()
        policy = docs["ConfigMap/meshserve-policy"]["data"]["policy.yaml"]
        (Path(mounts["/etc/meshserve/policy"]) / "policy.yaml").write_text(policy)
        job = docs["Job/meshserve-policy"]["spec"]["template"]["spec"]
        where = {
            **mounts,
            f"{prefix}/secrets": secret_dir("meshserve-controlplane", "job"),
            **addresses,
        }
        argv = [_moved(a, where) for a in _container_argv(job["containers"][0])]
        done = subprocess.run(
            [str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "spread-across-zones" in done.stdout
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_compose_services_run_with_their_commands_and_healthchecks(tmp_path: Path) -> None:
    """compose.yaml's services for real, on loopback (service names and ports moved there, the
    compose secrets laid out as /run/secrets would be): etcd, the control plane, the gateway
    and both nodes start with their commands, every healthcheck passes as written (etcdctl; the
    python one asking grpc.health.v1), and both nodes join."""
    import secrets
    import sys

    from meshserve.client._admin import AdminClient

    etcd_bin = shutil.which("etcd") or "/usr/bin/etcd"
    if not Path(etcd_bin).exists():
        pytest.skip("needs etcd")
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    run_secrets = tmp_path / "run-secrets"
    run_secrets.mkdir()
    for name, spec in compose["secrets"].items():
        assert spec["file"].startswith("./secrets/")
        (run_secrets / name).write_text(secrets.token_urlsafe(32) + "\n")
    ports = {
        "etcd:2379": _free_port(),
        "controlplane:8001": _free_port(),
        "gateway:8002": _free_port(),
        "node-1:9001": _free_port(),
        "node-2:9001": _free_port(),
    }
    peer = _free_port()
    common = {
        "/run/secrets": str(run_secrets),
        "http://etcd:2379": f"http://127.0.0.1:{ports['etcd:2379']}",
        "127.0.0.1:2380": f"127.0.0.1:{peer}",
        **{host: f"127.0.0.1:{port}" for host, port in ports.items()},
    }
    bin_dir = Path(sys.executable).parent
    procs: list[subprocess.Popen[bytes]] = []

    def moves_for(service: str) -> dict[str, str]:
        own = {p for h, p in ports.items() if h.split(":")[0] == service}
        port = own.pop() if own else 0
        return {
            **common,
            "http://0.0.0.0:2379": f"http://127.0.0.1:{ports['etcd:2379']}",
            "127.0.0.1:2379": f"127.0.0.1:{ports['etcd:2379']}",  # etcd's healthcheck
            "/etcd-data": str(tmp_path / "etcd-data"),
            "/var/cache/meshserve": str(tmp_path / f"{service}-cache"),
            "0.0.0.0:9090": f"127.0.0.1:{_free_port()}",
            **{
                f"{h}:{p}": f"127.0.0.1:{port}"
                for h in ("0.0.0.0", "127.0.0.1")
                for p in (8001, 8002, 9001)
            },
        }

    def start(service: str) -> Callable[[], bool]:
        spec = compose["services"][service]
        where = moves_for(service)
        argv = [_moved(str(a), where) for a in spec["command"]]
        program = etcd_bin if argv[0] == "etcd" else str(bin_dir / argv[0])
        log = (tmp_path / f"{service}.log").open("wb")
        procs.append(subprocess.Popen([program, *argv[1:]], stdout=log, stderr=subprocess.STDOUT))
        test = spec.get("healthcheck", {}).get("test")
        if not test:
            return lambda: True
        assert test[0] == "CMD"
        check = [_moved(str(a), where) for a in test[1:]]
        check[0] = sys.executable if check[0] == "python" else shutil.which(check[0]) or check[0]
        return lambda: subprocess.run(check, capture_output=True, timeout=10).returncode == 0

    try:
        for service in ("etcd", "controlplane", "gateway"):
            _wait(start(service), f"{service}'s healthcheck", procs[-1])
        for service in ("node-1", "node-2"):
            start(service)
        admin_token = (run_secrets / "admin_token").read_text().strip()
        with AdminClient(f"127.0.0.1:{ports['controlplane:8001']}", token=admin_token) as admin:
            _wait(
                lambda: {"node-1", "node-2"} <= {n.node_id for n in admin.list_nodes()},
                "both nodes joining",
                procs[-1],
            )
    finally:
        for proc in reversed(procs):
            _stop(proc)
