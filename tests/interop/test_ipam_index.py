"""Mixed writers on one store: the agent's indexed pyipam (in this process), the reference
host-local and one-shot pyipam processes, concurrently. No IP is handed out twice, and every
reservation and release made by one is seen by the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cnikit.spec.errors import EXHAUSTED, CNIError
from ipam import plugin
from ipam.index import Indexes
from testbed.harness import REFERENCE_PLUGINS

HOST_LOCAL = os.path.join(REFERENCE_PLUGINS, "host-local")
pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not os.path.exists(HOST_LOCAL), reason="no Debian host-local"),
]

SIZE = 30  # addresses in the range
PER_WRITER = 8


def _netconf(data_dir: Path, ipam_type: str) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "h16-mixed", "type": "none",
            "ipam": {"type": ipam_type, "dataDir": str(data_dir),
                     "ranges": [[{"subnet": "10.77.0.0/26", "rangeStart": "10.77.0.2",
                                  "rangeEnd": f"10.77.0.{1 + SIZE}"}]]}}


def _exec(argv: list[str], verb: str, netconf: dict[str, Any], cid: str) -> dict[str, Any] | None:
    env = {"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_NETNS": "/proc/self/ns/net",
           "CNI_IFNAME": "eth0", "CNI_PATH": REFERENCE_PLUGINS, "PYBRIDGE_AGENT_SOCKET": ""}
    done = subprocess.run(argv, input=json.dumps(netconf).encode(), env=env, capture_output=True,
                          check=False, timeout=60)
    assert done.returncode == 0, (argv, verb, cid, done.stdout, done.stderr)
    return json.loads(done.stdout) if done.stdout else None


def _ip(result: dict[str, Any] | None) -> str:
    assert result is not None
    return str(result["ips"][0]["address"].split("/")[0])


def test_the_index_stays_right_among_other_writers(tmp_path: Path, ipam_indexes: Indexes) -> None:
    hl, py = _netconf(tmp_path, "host-local"), _netconf(tmp_path, "pyipam")
    writers = {
        "indexed": lambda cid: _ip(plugin.ipam_add(py, cid, "eth0", {}, indexes=ipam_indexes)),
        "host-local": lambda cid: _ip(_exec([HOST_LOCAL], "ADD", hl, cid)),
        "one-shot": lambda cid: _ip(_exec([sys.executable, "-m", "ipam"], "ADD", py, cid)),
    }
    cids = [(name, f"{name}-{n}") for n in range(PER_WRITER) for name in writers]
    with ThreadPoolExecutor(len(writers)) as pool:
        ips = dict(zip(cids, pool.map(lambda c: writers[c[0]](c[1]), cids), strict=True))
    assert len(set(ips.values())) == len(cids), ips
    store = tmp_path / "h16-mixed"
    on_disk = {p.name: p.read_bytes().decode() for p in store.iterdir() if p.name.startswith("10.")}
    assert on_disk == {ip: f"{cid}\r\neth0" for (_, cid), ip in ips.items()}

    # Releases across writers: the index finds what the others reserved, and sees what they free.
    released = []
    for n in range(3):
        plugin.ipam_del(py, f"host-local-{n}", "eth0", indexes=ipam_indexes)
        plugin.ipam_del(py, f"one-shot-{n}", "eth0", indexes=ipam_indexes)
        _exec([HOST_LOCAL], "DEL", hl, f"indexed-{n}")
        _exec([sys.executable, "-m", "ipam"], "DEL", py, f"host-local-{n + 3}")
        released += [ips["host-local", f"host-local-{n}"], ips["one-shot", f"one-shot-{n}"],
                     ips["indexed", f"indexed-{n}"], ips["host-local", f"host-local-{n + 3}"]]
    held = {p.name for p in store.iterdir() if p.name.startswith("10.")}
    assert held == set(ips.values()) - set(released)

    # The indexed writer now fills exactly the free addresses, then finds the range full.
    more = [_ip(plugin.ipam_add(py, f"fill-{n}", "eth0", {}, indexes=ipam_indexes))
            for n in range(SIZE - len(held))]
    assert not set(more) & held and len(set(more)) == len(more)
    with pytest.raises(CNIError) as full:
        plugin.ipam_add(py, "one-too-many", "eth0", {}, indexes=ipam_indexes)
    assert full.value.code == EXHAUSTED
