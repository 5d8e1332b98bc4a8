"""NetworkPolicy (networking.k8s.io/v1) for the pods of this node, enforced with nftables.

objects.py  the API objects as typed models (NetworkPolicy, Pod, Namespace)
selectors.py label selectors (matchLabels, matchExpressions)
world.py    the pods and namespaces compiled from, with what is worked out on them once per ruleset
compile.py  (policies, pods, namespaces, node) -> what each local pod allows, per direction; what
            each policy compiled is kept for the next event (Memo)
nft.py      that decision -> the tables (delta's model, sets and verdict maps, by address and by
            bridge port) and their nftables script
apply.py    the script applied to / removed from the kernel in one `nft -f` transaction; pod ports read
policy_controller.py  the cache of watched objects, fed by kube events, re-applying on change
"""
