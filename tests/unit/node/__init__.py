"""Unit tests of cni_plugin/node/ (the node controller)."""
