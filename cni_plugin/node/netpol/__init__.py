"""NetworkPolicy (networking.k8s.io/v1) for the pods of this node, enforced with nftables.

objects.py  the API objects as typed models (NetworkPolicy, Pod, Namespace)
selectors.py label selectors (matchLabels, matchExpressions)
compile.py  (policies, pods, namespaces, node) -> what each local pod allows, per direction
nft.py      that decision -> one nftables script (sets and verdict maps, by address and by bridge port)
apply.py    the script applied to / removed from the kernel in one `nft -f` transaction; pod ports read
policy_controller.py  the cache of watched objects, fed by kube events, re-applying on change
"""
