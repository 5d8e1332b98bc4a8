"""load_ipam_config keeps what it parsed (ipam/config.py): the same inputs give the same frozen
config without a new parse, any input that differs gives its own, and errors are never kept."""

from __future__ import annotations

from typing import Any

import pytest

from cnikit.spec.errors import CNIError
from ipam.config import load_ipam_config

IPAM: dict[str, Any] = {"type": "pyipam", "dataDir": "/tmp/kept", "ranges": [[{"subnet": "10.7.0.0/24"}]]}
NETCONF: dict[str, Any] = {"cniVersion": "1.1.0", "name": "kept", "type": "pybridge", "ipam": IPAM}


def test_the_same_inputs_give_the_same_config_and_other_inputs_their_own() -> None:
    first = load_ipam_config(dict(NETCONF), {})
    assert load_ipam_config({**NETCONF, "cniVersion": "1.0.0"}, {"K8S_POD_NAME": "x"}) is first
    other_ip = load_ipam_config(NETCONF, {"IP": "10.7.0.9"})
    assert other_ip is not first and [str(ip) for ip in other_ip.requested_ips] == ["10.7.0.9"]
    ipam = {**IPAM, "ranges": [[{"subnet": "10.8.0.0/24"}]]}
    other_range = load_ipam_config({**NETCONF, "ipam": ipam}, {})
    assert [str(r.subnet) for r in other_range.ranges[0]] == ["10.8.0.0/24"]
    assert load_ipam_config({**NETCONF, "name": "kept2"}, {}).network == "kept2"


def test_an_invalid_config_fails_every_time_naming_its_field() -> None:
    bad = {**NETCONF, "ipam": {**IPAM, "lockTimeout": "soon"}}
    for _ in range(2):
        with pytest.raises(CNIError) as err:
            load_ipam_config(bad, {})
        assert "ipam.lockTimeout" in err.value.msg


def test_inputs_no_json_can_hold_are_parsed_as_they_are() -> None:
    odd = {**NETCONF, "args": {"other": {1, 2}}}  # not from JSON, but the args block ignores it
    assert load_ipam_config(odd, {}) is not load_ipam_config(odd, {})
    assert load_ipam_config(odd, {}).network == "kept"
