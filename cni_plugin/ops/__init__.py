"""Operating a node: metrics and health endpoints of the resident agents, `pybridge ls`, `pybridge doctor`.

Only the resident processes and the operator's commands import this package; the exec path never does.
"""
