"""The agent's options reach the calls it serves: pyipam's store indexes, kept across calls."""

from __future__ import annotations

import io
import json
from pathlib import Path

from cni_plugin.agent.server import Agent
from cnikit import programs
from ipam.index import Indexes


def _add(agent: Agent, data_dir: Path, container_id: str) -> int:
    conf = {"cniVersion": "1.1.0", "name": "opts", "type": "pybridge",
            "ipam": {"type": "pyipam", "dataDir": str(data_dir), "ranges": [[{"subnet": "10.78.0.0/28"}]]}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": container_id, "CNI_NETNS": "/proc/self/ns/net",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent"}
    out, err = io.StringIO(), io.StringIO()
    code = agent._run(programs.PYIPAM, env, json.dumps(conf).encode(), out, err, None)
    assert code == 0, (out.getvalue(), err.getvalue())
    return code


def test_the_agent_serves_pyipam_with_its_store_indexes(tmp_path: Path, ipam_indexes: Indexes) -> None:
    agent = Agent("unused", ipam_indexes=ipam_indexes)
    _add(agent, tmp_path, "c1")
    _add(agent, tmp_path, "c2")
    kept = ipam_indexes.of(str(tmp_path / "opts"))
    assert kept is not None
    # The index holds what the last call read: the store before c2's reservation.
    held = {str(r.ip): r.container_id for r in kept.entries.values() if r is not None}
    assert held == {"10.78.0.2": "c1"}

