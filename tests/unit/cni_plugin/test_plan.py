"""plan.plan: the IPAM result completed into what ADD puts on the pod and the bridge (pure)."""

from __future__ import annotations

from typing import Any

from cni_plugin import config, plan
from cnikit.spec.result import parse_result


def _plan(ipam: dict[str, Any], **conf: Any) -> plan.Plan:
    bridge = config.load({"cniVersion": "1.1.0", "name": "n", "type": "pybridge", **conf})
    return plan.plan(bridge, parse_result({"cniVersion": "1.1.0", **ipam}, "IPAM result"))


IPAM = {"ips": [{"address": "10.1.0.5/24"}, {"address": "fd01::5/64", "gateway": "fd01::fe"}],
        "routes": [{"dst": "10.9.0.0/16"}]}


def test_gateways_default_routes_and_pod_routes() -> None:
    got = _plan(IPAM, isDefaultGateway=True)
    assert [str(a) for a in got.addrs] == ["10.1.0.5/24", "fd01::5/64"]
    assert {v: str(g) for v, g in got.gateways.items()} == {4: "10.1.0.1/24", 6: "fd01::fe/64"}
    assert got.routes == [("10.9.0.0/16", "10.1.0.1"), ("0.0.0.0/0", "10.1.0.1"), ("::/0", "fd01::fe")]
    assert [(ip.interface, ip.gateway) for ip in got.result.ips] == [(2, "10.1.0.1"), (2, "fd01::fe")]


def test_without_is_gateway_only_ipam_gateways_count_and_no_default_route_is_added() -> None:
    got = _plan(IPAM)
    assert list(got.gateways) == [6] and got.result.ips[0].gateway is None
    assert got.routes == [("10.9.0.0/16", None)]


def test_an_ipam_default_route_is_kept_and_the_ipam_result_is_not_changed() -> None:
    ipam = parse_result({"cniVersion": "1.1.0", "ips": [{"address": "10.1.0.5/24"}],
                         "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.254"}]}, "IPAM result")
    bridge = config.load({"cniVersion": "1.1.0", "name": "n", "type": "pybridge", "isDefaultGateway": True})
    got = plan.plan(bridge, ipam)
    assert got.routes == [("0.0.0.0/0", "10.1.0.254")]
    assert ipam.ips[0].interface is None and ipam.ips[0].gateway is None
