"""The node controller (`pybridge node run`) that the DaemonSet runs on each Kubernetes node."""
