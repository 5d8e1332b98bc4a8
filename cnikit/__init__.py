"""The CNI protocol kit both plugins stand on: spec types and errors, skel, logging, the program registry.

It imports neither cni_plugin nor ipam."""
