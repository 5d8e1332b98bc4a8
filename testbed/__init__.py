"""Throw-away hosts and nodes the tests and bench/ both run: network namespaces
(harness.py), a private containerd node (node.py) with its CRI client (cri.py),
OCI images (oci.py) and containerd 2.x from Debian's unstable archive (containerd2.py)."""
