"""What the plugin's masquerade (masq.py), the node controller (node/) and `pybridge doctor` share about
the host: where its tools are found, the destinations never masqueraded, the names doctor reads
in the node controller's rules."""

from __future__ import annotations

import os
import shutil
from functools import cache

# Runtimes often exec plugins with a PATH without sbin, where nft and iptables live.
FALLBACK_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
# The node controller's NetworkPolicy tables, and the word a policy chain's comment carries before the
# fields that made the policy allow nothing (node/netpol/nft.py writes them, ops/doctor.py reads).
NETPOL_TABLE = "pybridge_netpol"
NETPOL_REFUSED = "refused:"


@cache
def find_binary(name: str) -> str | None:
    path = os.environ.get("PATH")
    return shutil.which(name, path=f"{path}:{FALLBACK_PATH}" if path else FALLBACK_PATH)
