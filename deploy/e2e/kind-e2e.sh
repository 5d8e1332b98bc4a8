#!/bin/bash
# `make kind-e2e`: pybridge's networking on the kind cluster made by `make kind-up`.
# Checks, each with kubectl exec from agnhost pods: pod -> pod on the other worker, pod ->
# ClusterIP Service, a Service backend reaching itself through its Service (hairpin), DNS for
# kubernetes.default, and a hostPort on a worker's InternalIP (portmap chained by the conflist).
# Optional: E2E_TEST=/path/to/e2e.test also runs upstream's [sig-network] Networking Granular Checks.
set -euo pipefail
K=${KUBECTL:-kubectl}
NS=pybridge-e2e
cd "$(dirname "$0")"

$K apply -f workloads.yaml
$K -n $NS wait --for=condition=Ready pod --all --timeout=180s

ip_of() { $K -n $NS get pod "$1" -o jsonpath='{.status.podIP}'; }
# agnhost's netexec answers /hostname; `agnhost connect` does a TCP connect and fails if it cannot;
# the agnhost image has curl and nslookup.
get() { $K -n $NS exec "$1" -- /agnhost connect --timeout=5s "$2"; }
hostname_via() { $K -n $NS exec "$1" -- curl -sS --max-time 5 "http://$2/hostname"; }

step() { echo "--- $*"; }

step "pod on pybridge-worker -> pod on pybridge-worker2"
get srv-a "$(ip_of srv-b):8080"
step "pod on pybridge-worker2 -> pod on pybridge-worker"
get srv-b "$(ip_of srv-a):8080"

SVC=$($K -n $NS get svc srv -o jsonpath='{.spec.clusterIP}')
step "ClusterIP $SVC answers (both backends, by name)"
seen=""
for _ in $(seq 20); do seen="$seen $(hostname_via hostport "$SVC:80")"; done
echo "$seen" | grep -q srv-a && echo "$seen" | grep -q srv-b

step "hairpin: each backend reaches itself through the Service"
for pod in srv-a srv-b; do
    ok=""
    for _ in $(seq 20); do
        if [ "$(hostname_via $pod "$SVC:80")" = "$pod" ]; then ok=1; break; fi
    done
    [ -n "$ok" ] || { echo "$pod never reached itself via $SVC"; exit 1; }
done

step "DNS: kubernetes.default resolves"
$K -n $NS exec srv-a -- nslookup kubernetes.default.svc.cluster.local

step "hostPort 18080 on pybridge-worker2's InternalIP, from a pod on pybridge-worker"
NODE_IP=$($K get node pybridge-worker2 -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
[ "$(hostname_via srv-a "${NODE_IP%% *}:18080")" = hostport ]

if [ -n "${E2E_TEST:-}" ]; then
    step "upstream [sig-network] Networking Granular Checks"
    "$E2E_TEST" --kubeconfig="${KUBECONFIG:-$HOME/.kube/config}" \
        --ginkgo.focus='\[sig-network\] Networking Granular Checks' --ginkgo.skip='Feature|Disruptive'
fi

$K delete namespace $NS --wait=false
echo "kind-e2e: all checks passed"
