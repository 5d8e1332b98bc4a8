"""Unit tests of cni_plugin/agent/."""
