"""What the kind-sim tests run in pods and what stands in for kube-proxy.

WHOAMI is a busybox httpd answering GET /cgi-bin/ip with the address the connection came from;
service_rules is what kube-proxy (nftables mode) programs for ClusterIP Services.
"""

from __future__ import annotations

import re

# busybox httpd answering GET /cgi-bin/ip with the address the connection came from
WHOAMI = [
    "/bin/sh",
    "-c",
    "mkdir -p /www/cgi-bin && printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\n"
    "echo $REMOTE_ADDR\\n' > /www/cgi-bin/ip && chmod +x /www/cgi-bin/ip && exec httpd -f -p 80 -h /www",
]
KUBE_PROXY_TABLE = "pbt_kube_proxy"


def http_get_script(address: str, port: int, path: str = "/cgi-bin/ip") -> str:
    """One HTTP GET with busybox nc (the static busybox's wget crashes in glibc's resolver)."""
    return f"printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {address} {port}"


def http_body(output: str) -> str | None:
    """The body of a 200 answer, or None; busybox httpd's CGI ends headers with a bare LF and
    gives an IPv4 peer in IPv6-mapped form ("[::ffff:10.70.1.3]"), which this unwraps."""
    parts = re.split(r"\r?\n\r?\n", output, maxsplit=1)
    if len(parts) != 2 or not re.match(r"HTTP/1\.[01] 200 ", parts[0]):
        return None
    return parts[1].strip().removeprefix("[").removesuffix("]").removeprefix("::ffff:")


def service_rules(services: list[tuple[str, str, int, str, int]]) -> str:
    """What kube-proxy (nftables mode) does for ClusterIP Services: DNAT the VIP to the endpoint,
    in prerouting (pods) and output (the node), masquerading a pod that reaches itself (hairpin)."""
    lines = [
        f"add table ip {KUBE_PROXY_TABLE}",
        f"delete table ip {KUBE_PROXY_TABLE}",
        f"table ip {KUBE_PROXY_TABLE} {{",
        "\tchain svc_mark { type nat hook prerouting priority dstnat - 1; policy accept;",
    ]
    lines += [
        f"\t\tip saddr {ep} ip daddr {vip} {proto} dport {port} meta mark set 0x4000"
        for proto, vip, port, ep, _ in services
    ]
    lines += ["\t}", "\tchain svc_dnat { type nat hook prerouting priority dstnat; policy accept;"]
    lines += [
        f"\t\tip daddr {vip} {proto} dport {port} dnat to {ep}:{ep_port}"
        for proto, vip, port, ep, ep_port in services
    ]
    lines += ["\t}", "\tchain svc_out { type nat hook output priority -100; policy accept;"]
    lines += [
        f"\t\tip daddr {vip} {proto} dport {port} dnat to {ep}:{ep_port}"
        for proto, vip, port, ep, ep_port in services
    ]
    lines += [
        "\t}",
        "\tchain svc_masq { type nat hook postrouting priority srcnat; policy accept;",
        "\t\tmeta mark 0x4000 masquerade",
        "\t}",
        "}",
        "",
    ]
    return "\n".join(lines)
