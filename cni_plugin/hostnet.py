"""What the plugin's masquerade (masq.py) and the node agent (node/) share about the host: where
its tools are found, and the destinations never masqueraded."""

from __future__ import annotations

import os
import shutil
from functools import cache

# Runtimes often exec plugins with a PATH without sbin, where nft and iptables live.
FALLBACK_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}


@cache
def find_binary(name: str) -> str | None:
    path = os.environ.get("PATH")
    return shutil.which(name, path=f"{path}:{FALLBACK_PATH}" if path else FALLBACK_PATH)
