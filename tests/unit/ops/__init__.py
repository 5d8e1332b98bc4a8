"""Unit tests of cni_plugin/ops/."""
