"""A small client for the CRI RuntimeService (k8s.io/cri-api runtime.v1) over containerd's socket.

Debian ships no crictl and we want no protoc step: the subset of runtime.v1 the tests use is
declared below as (field, number, type) and compiled into a descriptor at import time. Fields
the schema leaves out are skipped by protobuf when a reply carries them, so a subset is enough.
Field numbers follow kubernetes/cri-api pkg/apis/runtime/v1/api.proto.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

PACKAGE = "runtime.v1"
_F = descriptor_pb2.FieldDescriptorProto
_SCALAR = {"string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL, "int64": _F.TYPE_INT64,
           "int32": _F.TYPE_INT32, "uint32": _F.TYPE_UINT32, "bytes": _F.TYPE_BYTES}

ENUMS: dict[str, list[str]] = {
    "NamespaceMode": ["POD", "CONTAINER", "NODE", "TARGET"],
    "PodSandboxState": ["SANDBOX_READY", "SANDBOX_NOTREADY"],
    "ContainerState": ["CONTAINER_CREATED", "CONTAINER_RUNNING", "CONTAINER_EXITED", "CONTAINER_UNKNOWN"],
    "Protocol": ["TCP", "UDP", "SCTP"],
    "MountPropagation": ["PROPAGATION_PRIVATE", "PROPAGATION_HOST_TO_CONTAINER", "PROPAGATION_BIDIRECTIONAL"],
    "ProfileType": ["RuntimeDefault", "Unconfined", "Localhost"],
}

# message -> fields; a type is a scalar, an enum, a message, "map" (map<string, string>),
# each optionally prefixed with "*" for repeated.
MESSAGES: dict[str, list[tuple[str, int, str]]] = {
    "VersionRequest": [("version", 1, "string")],
    "VersionResponse": [("version", 1, "string"), ("runtime_name", 2, "string"),
                        ("runtime_version", 3, "string"), ("runtime_api_version", 4, "string")],
    "StatusRequest": [("verbose", 1, "bool")],
    "RuntimeCondition": [("type", 1, "string"), ("status", 2, "bool"), ("reason", 3, "string"),
                         ("message", 4, "string")],
    "RuntimeStatus": [("conditions", 1, "*RuntimeCondition")],
    "StatusResponse": [("status", 1, "RuntimeStatus"), ("info", 2, "map")],
    "PodSandboxMetadata": [("name", 1, "string"), ("uid", 2, "string"), ("namespace", 3, "string"),
                           ("attempt", 4, "uint32")],
    "PortMapping": [("protocol", 1, "Protocol"), ("container_port", 2, "int32"), ("host_port", 3, "int32"),
                    ("host_ip", 4, "string")],
    "NamespaceOption": [("network", 1, "NamespaceMode"), ("pid", 2, "NamespaceMode"),
                        ("ipc", 3, "NamespaceMode")],
    "LinuxSandboxSecurityContext": [("namespace_options", 1, "NamespaceOption"), ("privileged", 6, "bool")],
    "LinuxPodSandboxConfig": [("cgroup_parent", 1, "string"),
                              ("security_context", 2, "LinuxSandboxSecurityContext"), ("sysctls", 3, "map")],
    "DNSConfig": [("servers", 1, "*string"), ("searches", 2, "*string"), ("options", 3, "*string")],
    "PodSandboxConfig": [("metadata", 1, "PodSandboxMetadata"), ("hostname", 2, "string"),
                         ("log_directory", 3, "string"), ("dns_config", 4, "DNSConfig"),
                         ("port_mappings", 5, "*PortMapping"),
                         ("labels", 6, "map"), ("annotations", 7, "map"),
                         ("linux", 8, "LinuxPodSandboxConfig")],
    "RunPodSandboxRequest": [("config", 1, "PodSandboxConfig"), ("runtime_handler", 2, "string")],
    "RunPodSandboxResponse": [("pod_sandbox_id", 1, "string")],
    "PodSandboxStatusRequest": [("pod_sandbox_id", 1, "string"), ("verbose", 2, "bool")],
    "PodIP": [("ip", 1, "string")],
    "PodSandboxNetworkStatus": [("ip", 1, "string"), ("additional_ips", 2, "*PodIP")],
    "PodSandboxStatus": [("id", 1, "string"), ("metadata", 2, "PodSandboxMetadata"),
                         ("state", 3, "PodSandboxState"), ("network", 5, "PodSandboxNetworkStatus")],
    "PodSandboxStatusResponse": [("status", 1, "PodSandboxStatus"), ("info", 2, "map")],
    "StopPodSandboxRequest": [("pod_sandbox_id", 1, "string")],
    "StopPodSandboxResponse": [],
    "RemovePodSandboxRequest": [("pod_sandbox_id", 1, "string")],
    "RemovePodSandboxResponse": [],
    "ListPodSandboxRequest": [],
    "PodSandbox": [("id", 1, "string"), ("metadata", 2, "PodSandboxMetadata"),
                   ("state", 3, "PodSandboxState")],
    "ListPodSandboxResponse": [("items", 1, "*PodSandbox")],
    "ContainerMetadata": [("name", 1, "string"), ("attempt", 2, "uint32")],
    "ImageSpec": [("image", 1, "string")],
    "KeyValue": [("key", 1, "string"), ("value", 2, "string")],
    "Mount": [("container_path", 1, "string"), ("host_path", 2, "string"), ("readonly", 3, "bool"),
              ("propagation", 5, "MountPropagation")],
    "Capability": [("add_capabilities", 1, "*string"), ("drop_capabilities", 2, "*string")],
    "Int64Value": [("value", 1, "int64")],
    "SecurityProfile": [("profile_type", 1, "ProfileType"), ("localhost_ref", 2, "string")],
    "LinuxContainerSecurityContext": [("capabilities", 1, "Capability"), ("privileged", 2, "bool"),
                                      ("run_as_user", 5, "Int64Value"), ("readonly_rootfs", 7, "bool"),
                                      ("no_new_privs", 11, "bool"), ("run_as_group", 12, "Int64Value"),
                                      ("seccomp", 15, "SecurityProfile")],
    "LinuxContainerConfig": [("security_context", 2, "LinuxContainerSecurityContext")],
    "ContainerConfig": [("metadata", 1, "ContainerMetadata"), ("image", 2, "ImageSpec"),
                        ("command", 3, "*string"), ("args", 4, "*string"), ("envs", 6, "*KeyValue"),
                        ("mounts", 7, "*Mount"), ("labels", 9, "map"), ("log_path", 11, "string"),
                        ("linux", 15, "LinuxContainerConfig")],
    "CreateContainerRequest": [("pod_sandbox_id", 1, "string"), ("config", 2, "ContainerConfig"),
                               ("sandbox_config", 3, "PodSandboxConfig")],
    "CreateContainerResponse": [("container_id", 1, "string")],
    "StartContainerRequest": [("container_id", 1, "string")],
    "StartContainerResponse": [],
    "StopContainerRequest": [("container_id", 1, "string"), ("timeout", 2, "int64")],
    "StopContainerResponse": [],
    "RemoveContainerRequest": [("container_id", 1, "string")],
    "RemoveContainerResponse": [],
    "ContainerStatusRequest": [("container_id", 1, "string")],
    "ContainerStatus": [("id", 1, "string"), ("state", 3, "ContainerState"), ("exit_code", 7, "int32"),
                        ("reason", 10, "string"), ("message", 11, "string"), ("log_path", 15, "string")],
    "ContainerStatusResponse": [("status", 1, "ContainerStatus")],
    "ExecSyncRequest": [("container_id", 1, "string"), ("cmd", 2, "*string"), ("timeout", 3, "int64")],
    "ExecSyncResponse": [("stdout", 1, "bytes"), ("stderr", 2, "bytes"), ("exit_code", 3, "int32")],
}

RPCS = ("Version", "Status", "RunPodSandbox", "PodSandboxStatus", "StopPodSandbox", "RemovePodSandbox",
        "ListPodSandbox", "CreateContainer", "StartContainer", "StopContainer", "RemoveContainer",
        "ContainerStatus", "ExecSync")


def _lower_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _descriptor() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="pbt_cri_subset.proto", package=PACKAGE, syntax="proto3")
    for enum_name, values in ENUMS.items():
        enum = proto.enum_type.add(name=enum_name)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for message_name, fields in MESSAGES.items():
        message = proto.message_type.add(name=message_name)
        for field_name, number, kind in fields:
            field = message.field.add(name=field_name, number=number, json_name=_lower_camel(field_name))
            field.label = _F.LABEL_REPEATED if kind.startswith("*") else _F.LABEL_OPTIONAL
            kind = kind.lstrip("*")
            if kind == "map":  # map<string, string> is a repeated nested entry message
                entry = message.nested_type.add(name=_lower_camel(field_name).title() + "Entry")
                entry.options.map_entry = True
                for key_name, key_number in (("key", 1), ("value", 2)):
                    entry.field.add(name=key_name, number=key_number, type=_F.TYPE_STRING,
                                    label=_F.LABEL_OPTIONAL, json_name=key_name)
                field.label, field.type = _F.LABEL_REPEATED, _F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{message_name}.{entry.name}"
            elif kind in _SCALAR:
                field.type = _SCALAR[kind]
            elif kind in ENUMS:
                field.type, field.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{kind}"
            else:
                field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"
    return proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_descriptor())
TYPES = {name: message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))
         for name in MESSAGES}


class CRIClient:
    """`call("RunPodSandbox", {...})` -> the reply as a dict (proto field names, defaults kept)."""

    def __init__(self, socket: str, timeout: float = 60) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.timeout = timeout
        self._stubs = {
            rpc: self.channel.unary_unary(
                f"/{PACKAGE}.RuntimeService/{rpc}",
                request_serializer=TYPES[f"{rpc}Request"].SerializeToString,
                response_deserializer=TYPES[f"{rpc}Response"].FromString,
            )
            for rpc in RPCS
        }

    def raw(self, rpc: str, request: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        message = json_format.ParseDict(request or {}, TYPES[f"{rpc}Request"]())
        return self._stubs[rpc](message, timeout=timeout or self.timeout)

    def call(
        self, rpc: str, request: dict[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        return json_format.MessageToDict(self.raw(rpc, request, timeout), preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)

    def close(self) -> None:
        self.channel.close()

    # The calls the tests make, with kubelet's shapes.

    def run_pod(self, config: dict[str, Any]) -> str:
        return str(self.call("RunPodSandbox", {"config": config})["pod_sandbox_id"])

    def pod_status(self, pod_id: str) -> dict[str, Any]:
        reply = self.call("PodSandboxStatus", {"pod_sandbox_id": pod_id, "verbose": True})
        status: dict[str, Any] = reply["status"]
        info = reply.get("info", {}).get("info")
        status["info"] = json.loads(info) if info else {}
        return status

    def create_container(self, pod_id: str, sandbox: dict[str, Any], name: str, image: str,
                         command: list[str]) -> str:
        config = {"metadata": {"name": name}, "image": {"image": image}, "command": command}
        reply = self.call("CreateContainer", {"pod_sandbox_id": pod_id, "config": config,
                                              "sandbox_config": sandbox})
        return str(reply["container_id"])

    def start_container(self, container_id: str) -> None:
        self.call("StartContainer", {"container_id": container_id})

    def exec_sync(self, container_id: str, *cmd: str, timeout: int = 20) -> tuple[int, str, str]:
        reply = self.raw("ExecSync", {"container_id": container_id, "cmd": list(cmd), "timeout": timeout},
                         timeout=timeout + 10)
        out, err = (stream.decode(errors="replace") for stream in (reply.stdout, reply.stderr))
        return int(reply.exit_code), out, err

    def stop_pod(self, pod_id: str) -> None:
        self.call("StopPodSandbox", {"pod_sandbox_id": pod_id})

    def remove_pod(self, pod_id: str) -> None:
        self.call("RemovePodSandbox", {"pod_sandbox_id": pod_id})

    def list_pods(self) -> list[dict[str, Any]]:
        return list(self.call("ListPodSandbox")["items"])

    def conditions(self) -> dict[str, bool]:
        status = self.call("Status")["status"]
        return {c["type"]: bool(c["status"]) for c in status["conditions"]}

    def status(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """One verbose CRI Status, as kubelet asks it: each condition by type (status, reason,
        message), and containerd's `cniconfig` (the conflists it has loaded) as a dict."""
        reply = self.call("Status", {"verbose": True})
        conditions = {c["type"]: c for c in reply["status"]["conditions"]}
        return conditions, json.loads(reply["info"].get("cniconfig") or "{}")
