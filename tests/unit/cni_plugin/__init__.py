"""Unit tests of cni_plugin/ (the verbs, config, plan, nft, install)."""
