"""The fast path: a stdlib-only exec'd client (shim) forwarding calls to a resident agent."""
