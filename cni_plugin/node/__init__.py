"""The node agent (`pybridge node run`) that the DaemonSet runs on each Kubernetes node."""
