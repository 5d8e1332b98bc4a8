"""What kubelet does with a PodSpec, through a node's CRI: the manifest is read, never retyped.

A pod is a sandbox (host network or its own netns, which CRI asks the node's CNI for), its
hostPath volumes checked or created per `type` in the node's view, its init containers run one
by one to exit 0, then its containers started, each with the spec's command, env (`fieldRef`s
resolved), volume mounts (propagation included), securityContext and the service-account token
(automounted, or a projected volume) and KUBERNETES_SERVICE_* env of in-cluster config. Fields
this stand-in does not act on either are listed in IGNORED (scheduling and resource hints,
probes: no kubelet here) or make it fail naming the field, so a manifest change is never
skipped in silence.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.cri import CRIClient
from testbed.node import wait_for

from ..fakeapi.apiserver import Store

SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
PROPAGATION = {
    None: "PROPAGATION_PRIVATE",
    "None": "PROPAGATION_PRIVATE",
    "HostToContainer": "PROPAGATION_HOST_TO_CONTAINER",
    "Bidirectional": "PROPAGATION_BIDIRECTIONAL",
}
POD_IGNORED = {
    "serviceAccountName",
    "priorityClassName",
    "tolerations",
    "terminationGracePeriodSeconds",
    "nodeSelector",
    "affinity",
}
# resources: runc would enforce them, but testbed/cri.py's schema has no LinuxContainerResources
CONTAINER_IGNORED = {"imagePullPolicy", "resources", "livenessProbe", "readinessProbe", "startupProbe"}
TOKEN_SOURCES = {"serviceAccountToken", "configMap", "downwardAPI"}  # kube-api-access's
ENV_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
SECCOMP = {"RuntimeDefault": "RuntimeDefault", "Unconfined": "Unconfined"}


class Unsupported(Exception):
    """A manifest field this stand-in cannot honour: named, never skipped."""


def image_reference(name: str) -> str:
    """CRI's normalisation of a short image name (`pybridge:dev` -> docker.io/library/pybridge:dev)."""
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return name
    return f"docker.io/{name}" if rest else f"docker.io/library/{name}"


def check_host_path(path: Path, kind: str) -> None:
    """kubelet's hostPath `type` rules, `path` as seen from here (the node's tree)."""
    if kind == "DirectoryOrCreate":
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    elif kind == "FileOrCreate" and not path.exists():
        if not path.parent.is_dir():  # kubelet creates the file, never its parents
            raise Unsupported(f"hostPath {path}: FileOrCreate with a missing parent directory")
        path.touch(0o644)
    checks: dict[str, Callable[[int], bool]] = {
        "DirectoryOrCreate": stat.S_ISDIR,
        "Directory": stat.S_ISDIR,
        "FileOrCreate": stat.S_ISREG,
        "File": stat.S_ISREG,
        "Socket": stat.S_ISSOCK,
        "CharDevice": stat.S_ISCHR,
        "BlockDevice": stat.S_ISBLK,
    }
    if kind and kind not in checks:
        raise Unsupported(f"hostPath type {kind!r}")
    if kind and not (path.exists() and checks[kind](path.stat().st_mode)):
        raise AssertionError(f"hostPath {path} is not a {kind}")


def _security_context(sc: dict[str, Any]) -> dict[str, Any]:
    known = {
        "privileged",
        "capabilities",
        "readOnlyRootFilesystem",
        "allowPrivilegeEscalation",
        "seccompProfile",
        "runAsUser",
        "runAsGroup",
        "runAsNonRoot",
    }
    if extra := set(sc) - known:
        raise Unsupported(f"securityContext fields {sorted(extra)}")
    caps = sc.get("capabilities", {})
    out: dict[str, Any] = {
        "privileged": bool(sc.get("privileged")),
        "capabilities": {"add_capabilities": caps.get("add", []), "drop_capabilities": caps.get("drop", [])},
        "readonly_rootfs": bool(sc.get("readOnlyRootFilesystem")),
        "no_new_privs": sc.get("allowPrivilegeEscalation") is False,
    }
    for key, cri in (("runAsUser", "run_as_user"), ("runAsGroup", "run_as_group")):
        if key in sc:
            out[cri] = {"value": sc[key]}
    if sc.get("runAsNonRoot") and not sc.get("runAsUser"):
        raise Unsupported("runAsNonRoot without runAsUser (kubelet would read the image's user)")
    if "seccompProfile" in sc:
        kind = sc["seccompProfile"].get("type")
        if kind not in SECCOMP:
            raise Unsupported(f"seccompProfile type {kind!r}")
        out["seccomp"] = {"profile_type": SECCOMP[kind]}
    return out


def _pod_defaults(pod_sc: dict[str, Any]) -> dict[str, Any]:
    """The pod-level securityContext fields a container inherits unless it sets its own."""
    inherited = {"seccompProfile", "runAsUser", "runAsGroup", "runAsNonRoot"}
    if extra := set(pod_sc) - inherited:
        raise Unsupported(f"pod securityContext fields {sorted(extra)}")
    return dict(pod_sc)


@dataclass
class Pod:
    name: str
    namespace: str
    id: str
    config: dict[str, Any]
    ip: str
    spec: dict[str, Any]
    labels: dict[str, str]
    node: str
    log_dir: Path
    ips: list[str] = field(default_factory=list)  # every family's, as status.podIPs
    run_seconds: float = 0.0  # the RunPodSandbox call alone (CNI ADD included)
    containers: dict[str, str] = field(default_factory=dict)  # name -> container id
    attempts: dict[str, int] = field(default_factory=dict)

    def log(self, container: str) -> str:
        """The container's CRI log lines (all attempts), the message part only."""
        lines = []
        for path in sorted(self.log_dir.glob(f"{container}/*.log")):
            for line in path.read_text(errors="replace").splitlines():
                lines.append(line.split(" ", 3)[-1])  # "<time> <stream> <F|P> <message>"
        return "\n".join(lines)


@dataclass
class Kubelet:
    """One node's kubelet stand-in. `node_path` maps a node path to where this process sees it."""

    node_name: str
    node_ip: str
    cri: CRIClient
    cgroup_parent: str
    log_root: Path  # as this process sees it; the node sees the same path
    sa_dir: Path  # token, ca.crt, namespace of the service account
    api_host: str
    api_port: int
    node_path: Callable[[str], Path]
    store: Store | None = None  # the API server's objects: this kubelet posts its pods there
    node_ip6: str = ""
    pods: dict[str, Pod] = field(default_factory=dict)

    # --- pods -------------------------------------------------------------------------------

    def run_pod(
        self,
        name: str,
        spec: dict[str, Any],
        namespace: str = "default",
        labels: dict[str, str] | None = None,
        dns: dict[str, list[str]] | None = None,
    ) -> Pod:
        known = {"hostNetwork", "initContainers", "containers", "volumes", "securityContext",
                 "automountServiceAccountToken"}
        if extra := set(spec) - POD_IGNORED - known:
            raise Unsupported(f"pod spec fields {sorted(extra)}")
        uid = secrets.token_hex(8)
        host_network = bool(spec.get("hostNetwork"))
        containers = [*spec.get("initContainers", []), *spec["containers"]]
        privileged = any(c.get("securityContext", {}).get("privileged") for c in containers)
        log_dir = self.log_root / f"{namespace}_{name}_{uid}"
        config: dict[str, Any] = {
            "metadata": {"name": name, "uid": uid, "namespace": namespace, "attempt": 0},
            # kubelet sets no hostname on a host-network pod (runc refuses one without a UTS ns)
            "hostname": "" if host_network else name,
            "log_directory": str(log_dir),
            "labels": dict(labels or {}),
            "port_mappings": [
                {
                    "protocol": p.get("protocol", "TCP"),
                    "container_port": p["containerPort"],
                    "host_port": p["hostPort"],
                }
                for c in containers
                for p in c.get("ports", [])
                if p.get("hostPort")
            ],
            "linux": {
                "cgroup_parent": f"{self.cgroup_parent}/pod{uid}",
                "security_context": {
                    "privileged": privileged,
                    "namespace_options": {"network": "NODE" if host_network else "POD"},
                },
            },
        }
        if dns:
            config["dns_config"] = dns
        mounts = self._volumes(spec.get("volumes", []))
        started = time.perf_counter()
        pod_id = self.cri.run_pod(config)
        run_seconds = time.perf_counter() - started
        if host_network:
            ips = [a for a in (self.node_ip, self.node_ip6) if a]
        else:
            network = self.cri.pod_status(pod_id)["network"]
            ips = [network["ip"], *(a["ip"] for a in network.get("additional_ips") or [])]
        pod = Pod(
            name,
            namespace,
            pod_id,
            config,
            ips[0],
            spec,
            dict(labels or {}),
            self.node_name,
            log_dir,
            ips,
            run_seconds,
        )
        self.pods[pod_id] = pod
        for container in spec.get("initContainers", []):
            self.wait_exit(pod, self.start(pod, container, mounts), 60)
        for container in spec["containers"]:
            self.start(pod, container, mounts)
        self.post(pod)
        return pod

    def api_object(self, pod: Pod) -> dict[str, Any]:
        """The Pod as the API serves it once scheduled here and its status posted by kubelet."""
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name,
                "namespace": pod.namespace,
                "uid": pod.config["metadata"]["uid"],
                "labels": dict(pod.labels),
            },
            "spec": {**pod.spec, "nodeName": self.node_name},
            "status": {
                "phase": "Running",
                "hostIP": self.node_ip,
                "podIP": pod.ip,
                "podIPs": [{"ip": ip} for ip in pod.ips or [pod.ip]],
            },
        }

    def post(self, pod: Pod) -> None:
        """Create or update the pod's API object (labels changed: the API's update, not kubelet's)."""
        if self.store is not None:
            self.store.put("pods", self.api_object(pod))

    def _volumes(self, volumes: list[dict[str, Any]]) -> dict[str, str]:
        """volume name -> host path (the node's view), each checked or created per its type; a
        projected service-account token is the API server's token, CA and namespace."""
        out = {}
        for volume in volumes:
            if set(volume) == {"name", "projected"}:
                kinds = {kind for source in volume["projected"]["sources"] for kind in source}
                if "serviceAccountToken" not in kinds or kinds - TOKEN_SOURCES:
                    raise Unsupported(f"volume {volume['name']!r}: projected sources {sorted(kinds)}")
                out[volume["name"]] = str(self.sa_dir)
                continue
            if set(volume) != {"name", "hostPath"}:
                raise Unsupported(f"volume {volume['name']!r}: only hostPath volumes are simulated")
            path = volume["hostPath"]["path"]
            check_host_path(self.node_path(path), volume["hostPath"].get("type", ""))
            out[volume["name"]] = path
        return out

    def start(self, pod: Pod, container: dict[str, Any], mounts: dict[str, str] | None = None) -> str:
        known = {"name", "image", "command", "args", "env", "volumeMounts", "securityContext", "ports"}
        if extra := set(container) - known - CONTAINER_IGNORED:
            raise Unsupported(f"container {container['name']!r} fields {sorted(extra)}")
        mounts = mounts if mounts is not None else self._volumes(pod.spec.get("volumes", []))
        name = container["name"]
        attempt = pod.attempts.get(name, -1) + 1
        pod.attempts[name] = attempt
        env = [
            {"key": "KUBERNETES_SERVICE_HOST", "value": self.api_host},
            {"key": "KUBERNETES_SERVICE_PORT", "value": str(self.api_port)},
        ]
        defined: dict[str, str] = {}
        for e in container.get("env", []):
            defined[e["name"]] = self._env_value(pod, e, defined)
        env += [{"key": key, "value": value} for key, value in defined.items()]
        config = {
            "metadata": {"name": name, "attempt": attempt},
            "image": {"image": image_reference(container["image"])},
            "command": container.get("command", []),
            "args": container.get("args", []),
            "envs": env,
            "mounts": [
                *(
                    {
                        "container_path": m["mountPath"],
                        "host_path": mounts[m["name"]],
                        "readonly": bool(m.get("readOnly")),
                        "propagation": PROPAGATION[m.get("mountPropagation")],
                    }
                    for m in container.get("volumeMounts", [])
                ),
                *(
                    [{"container_path": SA_PATH, "host_path": str(self.sa_dir), "readonly": True}]
                    if pod.spec.get("automountServiceAccountToken", True)
                    else []
                ),
            ],
            "log_path": f"{name}/{attempt}.log",
            "linux": {
                "security_context": _security_context(
                    {
                        **_pod_defaults(pod.spec.get("securityContext", {})),
                        **container.get("securityContext", {}),
                    }
                )
            },
        }
        reply = self.cri.call(
            "CreateContainer", {"pod_sandbox_id": pod.id, "config": config, "sandbox_config": pod.config}
        )
        cid = str(reply["container_id"])
        self.cri.start_container(cid)
        pod.containers[name] = cid
        return cid

    def _env_value(self, pod: Pod, env: dict[str, Any], defined: dict[str, str]) -> str:
        """A value with $(VAR) of the variables defined before it expanded ($$ is a $), as the
        kubelet does; a fieldRef resolved."""
        if "value" in env:
            return ENV_REFERENCE.sub(lambda m: "$" if m[0] == "$$" else defined.get(m[1], m[0]),
                                     str(env["value"]))
        path = env["valueFrom"]["fieldRef"]["fieldPath"]
        fields = {
            "spec.nodeName": self.node_name,
            "metadata.name": pod.name,
            "metadata.namespace": pod.namespace,
            "status.hostIP": self.node_ip,
            "status.podIP": pod.ip,
        }
        if path not in fields:
            raise Unsupported(f"env {env['name']}: fieldRef {path}")
        return fields[path]

    def state(self, cid: str) -> dict[str, Any]:
        return dict(self.cri.call("ContainerStatus", {"container_id": cid})["status"])

    def wait_exit(self, pod: Pod, cid: str, timeout: float) -> None:
        status = wait_for(
            lambda: (s := self.state(cid))["state"] == "CONTAINER_EXITED" and s,
            timeout,
            f"{pod.name} init container to exit",
        )
        if status["exit_code"] != 0:
            raise AssertionError(
                f"init container of {pod.name} exited {status['exit_code']}:\n"
                f"{pod.log(status.get('log_path', '').split('/')[0])[-2000:]}"
            )

    def restart(self, pod: Pod, name: str, timeout: int = 10) -> str:
        """Stop and remove one container, then create and start it again (kubelet's restart)."""
        self.stop_container(pod, name, timeout)
        spec = next(c for c in pod.spec["containers"] if c["name"] == name)
        return self.start(pod, spec)

    def stop_container(self, pod: Pod, name: str, timeout: int = 10) -> int:
        """SIGTERM, SIGKILL after `timeout` s, as kubelet; the container's exit code."""
        cid = pod.containers.pop(name)
        self.cri.call("StopContainer", {"container_id": cid, "timeout": timeout}, timeout=timeout + 30)
        code = int(self.state(cid)["exit_code"])
        self.cri.call("RemoveContainer", {"container_id": cid})
        return code

    def exec(self, pod: Pod, *cmd: str, container: str | None = None, timeout: int = 20) -> tuple[int, str]:
        cid = pod.containers[container] if container else next(iter(pod.containers.values()))
        rc, out, err = self.cri.exec_sync(cid, *cmd, timeout=timeout)
        return rc, out + err

    def delete_pod(self, pod: Pod) -> None:
        self.cri.stop_pod(pod.id)
        self.cri.remove_pod(pod.id)
        self.pods.pop(pod.id, None)
        if self.store is not None:
            self.store.remove("pods", f"{pod.namespace}/{pod.name}")


def write_service_account(directory: Path, token: str, ca: bytes, namespace: str = "kube-system") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in (("token", token.encode()), ("ca.crt", ca), ("namespace", namespace.encode())):
        (directory / name).write_bytes(data)
        os.chmod(directory / name, 0o644)
    return directory
