"""Unit tests of cni_plugin/node/netpol/ (the policy controller)."""
