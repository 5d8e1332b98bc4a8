"""deploy/ and kind-config.yaml, checked without a cluster.

Every Kubernetes object is validated against the API schema as the official client's models
describe it: each key must be a field of its type (a typo such as `hostNetwrok` fails, where the
client's own deserializer would drop it silently), each value of the declared type, and the
models' required fields present. Then the cross-file facts the deployment relies on.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KINDS = {
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "Pod"): "V1Pod",
    ("v1", "Service"): "V1Service",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
}
PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "float": (int, float),
    "object": (object,),
    "datetime": (str,),
    "date": (str,),
    "bytes": (str,),
}
# Older clients spell containers list[X] and dict(str, X), newer ones List[X] and Dict[str, X].
# IntOrString and Quantity fields are "object" in the models; both accept str or int.


def validate(value: Any, type_name: str, path: str = "") -> list[str]:
    errors: list[str] = []
    if value is None:
        return errors
    if type_name.startswith(("list[", "List[")):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        for i, item in enumerate(value):
            errors += validate(item, type_name[5:-1], f"{path}[{i}]")
        return errors
    if type_name.startswith(("dict(", "Dict[")):
        if not isinstance(value, dict):
            return [f"{path}: expected a map"]
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        for key, item in value.items():
            errors += validate(item, inner, f"{path}.{key}")
        return errors
    if type_name in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {type(value).__name__}"]
    model = getattr(client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected {type_name} (a map)"]
    by_json = {json_key: attr for attr, json_key in model.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: not a field of {type_name}")
            continue
        errors += validate(item, model.openapi_types[by_json[key]], f"{path}.{key}")
    if not errors:  # the models' constructors enforce required fields
        try:
            model(**{by_json[k]: v for k, v in value.items()})
        except ValueError as exc:
            errors.append(f"{path}: {exc}")
    return errors


def validate_object(obj: dict[str, Any]) -> list[str]:
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in KINDS:
        return [f"unknown apiVersion/kind {key}"]
    return validate(obj, KINDS[key], obj["kind"])  # type: ignore[arg-type]


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


MANIFESTS = [DEPLOY / "pybridge.yaml", DEPLOY / "e2e" / "workloads.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_api_schema(path: Path) -> None:
    for obj in documents(path):
        assert validate_object(obj) == [], obj["metadata"]["name"]


def test_a_typo_fails() -> None:
    ds = next(d for d in documents(DEPLOY / "pybridge.yaml") if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    spec["hostNetwrok"] = spec.pop("hostNetwork")
    assert validate_object(ds) == ["DaemonSet.spec.template.spec.hostNetwrok: not a field of V1PodSpec"]
    spec["hostNetwork"] = "yes"
    del spec["hostNetwrok"]
    assert validate_object(ds) == ["DaemonSet.spec.template.spec.hostNetwork: expected bool, got str"]
    spec["hostNetwork"] = True
    del spec["containers"][0]["name"]
    assert any("name" in e for e in validate_object(ds))


def daemonset() -> dict[str, Any]:
    return next(d for d in documents(DEPLOY / "pybridge.yaml") if d["kind"] == "DaemonSet")


def test_daemonset_shape() -> None:
    ds = daemonset()
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert (
        ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    init = pod["initContainers"][0]
    assert init["command"][1:3] == ["node", "install"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert containers["agent"]["command"][1] == "agent"
    assert containers["node"]["command"][1:3] == ["node", "run"]
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {
        c["name"]: {m["mountPath"]: volumes.get(m["name"]) for m in c["volumeMounts"]}
        for c in [init, *pod["containers"]]
    }
    # the exec'd plugin (host) and the agent (container) must see the same socket and IPAM store
    assert mounts["agent"]["/run/pybridge"] == "/run/pybridge"
    assert mounts["agent"]["/run/cni-ipam-state"] == "/run/cni-ipam-state"
    assert mounts["node"]["/etc/cni/net.d"] == "/etc/cni/net.d"
    assert mounts["install"]["/host/opt/cni/bin"] == "/opt/cni/bin"
    store = init["command"][init["command"].index("--store-dir") + 1]
    host_store = init["command"][init["command"].index("--host-store-dir") + 1]
    assert mounts["install"][store] == host_store
    env = {e["name"]: e for e in containers["node"]["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    images = {c["image"] for c in [init, *pod["containers"]]}
    assert images == {"pybridge:dev"}
    assert re.search(r"^IMAGE\s*\?=\s*pybridge:dev$", (REPO / "Makefile").read_text(), re.M)


def test_probes_and_scraping_reach_the_metrics_endpoints() -> None:
    """Each agent serves /metrics where its named port says, on the pod IP (the node's,
    hostNetwork: Prometheus runs in a pod), and Prometheus' annotations point at the agent's;
    the probes go to the health endpoint on loopback, which no pod reaches."""
    template = daemonset()["spec"]["template"]
    containers = {c["name"]: c for c in template["spec"]["containers"]}
    ports, health = {}, {}
    for name, port_name in (("agent", "metrics"), ("node", "node-metrics")):
        container = containers[name]
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert list(env).index("POD_IP") < list(env).index("PYBRIDGE_METRICS_ADDRESS")  # $(POD_IP) expands
        host, _, port = env["PYBRIDGE_METRICS_ADDRESS"]["value"].rpartition(":")
        assert host == "$(POD_IP)"
        assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [(port_name, int(port))]
        health_host, _, health_port = env["PYBRIDGE_HEALTH_ADDRESS"]["value"].rpartition(":")
        assert health_host == "127.0.0.1"
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            wanted = {"host": "127.0.0.1", "path": path, "port": int(health_port)}
            assert container[probe]["httpGet"] == wanted
        ports[name], health[name] = int(port), int(health_port)
    assert len({*ports.values(), *health.values()}) == 4  # all on the host network
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["agent"]
    assert annotations["prometheus.io/path"] == "/metrics"
    # the agent reads the conflists for its pool gauges
    mounts = {m["mountPath"]: m for m in containers["agent"]["volumeMounts"]}
    assert mounts["/etc/cni/net.d"]["readOnly"] is True


# What each container's code uses; the reason is beside each in the manifest.
CAPABILITIES = {"install": set(), "agent": {"NET_ADMIN", "SYS_ADMIN"}, "node": {"NET_ADMIN"}}


def all_containers() -> list[dict[str, Any]]:
    pod = daemonset()["spec"]["template"]["spec"]
    return [*pod["initContainers"], *pod["containers"]]


def test_containers_run_with_least_privilege() -> None:
    """None privileged (its seccomp profile and capability list would not apply): ALL dropped,
    back only what the code uses, RuntimeDefault seccomp, no escalation, read-only root."""
    pod = daemonset()["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {c["name"] for c in all_containers()} == set(CAPABILITIES)
    for c in all_containers():
        sc = c["securityContext"]
        assert sc.get("privileged", False) is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert set(sc["capabilities"].get("add", [])) == CAPABILITIES[c["name"]], c["name"]


def quantity(value: str | int) -> float:
    """A CPU or memory quantity of the forms the manifest uses (500m, 1, 64Mi)."""
    text = str(value)
    for suffix, factor in (("m", 1e-3), ("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_every_container_has_requests_and_limits() -> None:
    for c in all_containers():
        resources = c["resources"]
        for kind in ("cpu", "memory"):
            request, limit = resources["requests"][kind], resources["limits"][kind]
            assert 0 < quantity(request) <= quantity(limit), (c["name"], kind)


SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def test_only_the_node_agent_gets_an_api_token() -> None:
    """No token by default; `node`, the one container that reads the API, mounts a projected
    one where in-cluster config looks, with the CA and namespace beside it."""
    pod = daemonset()["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    with_token = {}
    for c in all_containers():
        for m in c.get("volumeMounts", []):
            projected = volumes[m["name"]].get("projected", {})
            if any("serviceAccountToken" in source for source in projected.get("sources", [])):
                with_token[c["name"]] = (m["mountPath"], m.get("readOnly"), projected["sources"])
    assert list(with_token) == ["node"]
    path, read_only, sources = with_token["node"]
    assert (path, read_only) == (SA_PATH, True)
    files = {source.get("serviceAccountToken", {}).get("path") for source in sources}
    files |= {i["path"] for source in sources for kind in ("configMap", "downwardAPI")
              for i in source.get(kind, {}).get("items", [])}
    assert files >= {"token", "ca.crt", "namespace"}


def test_host_state_is_mounted_read_only_where_nothing_writes_it() -> None:
    """/var/lib/cni is read-only in every container but for libcni's result cache in the agent
    (its collector removes what it released); of /proc/sys only net/ is mounted (writable: the
    agent's sysctls), where PYBRIDGE_PROC_SYS points the agent."""
    pod = daemonset()["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    for c in all_containers():
        for m in c.get("volumeMounts", []):
            source = host_paths.get(m["name"], "")
            if (source == "/var/lib/cni" or source.startswith("/var/lib/cni/")) \
                    and (c["name"], source) != ("agent", "/var/lib/cni/results"):
                assert m.get("readOnly") is True, (c["name"], m["mountPath"])
            if source.startswith("/run/containerd"):
                assert (c["name"], m.get("readOnly")) == ("agent", True), (c["name"], source)
            if source.startswith("/proc"):
                assert (c["name"], source) == ("agent", "/proc/sys/net"), source
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert f"{env['PYBRIDGE_PROC_SYS']}/net" == m["mountPath"]


def test_the_agents_collector_reaches_what_it_needs() -> None:
    """The runtime socket where the collector looks for it (a restarted containerd's new socket
    seen through the directory), libcni's result cache writable, the netns pins and the IPAM
    state (where pybridge records each attachment's netns path) as the plugin sees them."""
    from cni_plugin.ops import collector

    pod = daemonset()["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    env = {e["name"]: e.get("value") for e in agent["env"]}
    socket = env.get(collector.RUNTIME_SOCKET_ENV, collector.DEFAULT_RUNTIME_SOCKET)
    mounts = {m["mountPath"]: (host_paths[m["name"]], m) for m in agent["volumeMounts"]}
    source, mount = mounts[os.path.dirname(socket)]
    assert source == os.path.dirname(socket) and mount["readOnly"] is True
    assert mount["mountPropagation"] == "HostToContainer"
    cache = env.get(collector.CACHE_DIR_ENV, "/var/lib/cni/results")
    assert mounts[cache][0] == cache and not mounts[cache][1].get("readOnly")
    assert mounts["/var/run/netns"][1]["mountPropagation"] == "HostToContainer"
    assert not mounts["/run/cni-ipam-state"][1].get("readOnly")


def test_every_added_capability_and_privilege_says_why() -> None:
    lines = (DEPLOY / "pybridge.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*add: \[", line):
            assert "#" in line, f"line {i + 1}: a capability without its reason"
        assert not re.match(r"\s*privileged: true", line), f"line {i + 1}: privileged"


def test_rbac_lets_the_service_account_watch_nodes() -> None:
    docs = documents(DEPLOY / "pybridge.yaml")
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    account = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
        # NetworkPolicy enforcement (cni_plugin/node/netpol)
        {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["list", "watch"]},
        # ClusterNetworkPolicy: read-only, that resource only (not its status, not other kinds of its group)
        {"apiGroups": ["policy.networking.k8s.io"], "resources": ["clusternetworkpolicies"],
         "verbs": ["list", "watch"]},
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    assert daemonset()["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert daemonset()["metadata"]["namespace"] == account["metadata"]["namespace"]


# Networks a kind host commonly has or routes to; the cluster's subnets must not overlap them.
COMMON_HOST_NETWORKS = [
    "172.16.0.0/12",  # docker's default bridge and address pools, kind's own network
    "192.168.0.0/16",  # home/office LANs, docker's second pool, libvirt
    "10.0.0.0/16",
    "10.1.0.0/16",  # Azure default VNet, many routers
    "10.128.0.0/9",  # GCP auto-mode VPC
    "10.88.0.0/16",  # podman's default network
    "10.42.0.0/15",  # k3s pods and services
    "10.244.0.0/16",
    "10.96.0.0/12",  # kind's defaults (another kind cluster beside this one)
    "100.64.0.0/10",  # CGNAT, Tailscale
    "fc00:f853:ccd:e793::/64",  # kind's docker network (IPv6)
]
KIND_KEYS = {
    "kind",
    "apiVersion",
    "name",
    "networking",
    "nodes",
    "featureGates",
    "runtimeConfig",
    "kubeadmConfigPatches",
    "containerdConfigPatches",
}
NETWORKING_KEYS = {
    "ipFamily",
    "apiServerAddress",
    "apiServerPort",
    "podSubnet",
    "serviceSubnet",
    "disableDefaultCNI",
    "kubeProxyMode",
    "dnsSearch",
}
NODE_KEYS = {"role", "image", "extraMounts", "extraPortMappings", "labels", "kubeadmConfigPatches"}


def subnets(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(s.strip()) for s in text.split(",")]


@pytest.mark.parametrize(
    "path", [REPO / "kind-config.yaml", DEPLOY / "kind-config-dualstack.yaml"], ids=lambda p: p.name
)
def test_kind_config(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) <= KIND_KEYS
    assert (cfg["kind"], cfg["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    net = cfg["networking"]
    assert set(net) <= NETWORKING_KEYS
    assert net["disableDefaultCNI"] is True
    assert all(set(n) <= NODE_KEYS for n in cfg["nodes"])
    assert [n["role"] for n in cfg["nodes"]] == ["control-plane", "worker", "worker"]
    pods, services = subnets(net["podSubnet"]), subnets(net["serviceSubnet"])
    families = {n.version for n in pods}
    assert families == {n.version for n in services}
    assert families == ({4, 6} if net.get("ipFamily") == "dual" else {4})
    common = [ipaddress.ip_network(n) for n in COMMON_HOST_NETWORKS]
    for mine in pods + services:
        clashes = [str(c) for c in common if c.version == mine.version and c.overlaps(mine)]
        assert not clashes, f"{mine} overlaps {clashes}"
    assert not any(p.overlaps(s) for p in pods for s in services if p.version == s.version)
    # the node controller never masquerades within POD_SUBNET: it must cover the pods of both configs
    env = {e["name"]: e.get("value") for e in daemonset()["spec"]["template"]["spec"]["containers"][1]["env"]}
    allowed = subnets(env["POD_SUBNET"])
    assert all(any(p.version == a.version and p.subnet_of(a) for a in allowed) for p in pods)  # type: ignore[arg-type]


def test_dockerfile_is_multi_stage_and_ships_only_the_bundle() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M)
    assert len(stages) == 2 and stages[0][1] == "build"
    assert "python" not in stages[1][0]
    assert "COPY --from=build /src/dist/pybridge /opt/pybridge/bundle" in text
    assert "deploy/bundle/pybridge.spec" in text
    ds = daemonset()["spec"]["template"]["spec"]
    assert all(
        c["command"][0] == "/opt/pybridge/bundle/pybridge" for c in [*ds["initContainers"], *ds["containers"]]
    )
