#!/bin/bash
# make demo: two pods on a bridge inside a throw-away "host" netns, a ping between them, then
# DEL and cleanup. Nothing is done in the machine's own network namespace.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then echo "run as root (sudo make demo)" >&2; exit 1; fi
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin}
CONFLIST=${CONFLIST:-$(dirname "$0")/../conf/10-pybridge.conflist}
ID=$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')
HOST=pbdemo-host-$ID A=pbdemo-a-$ID B=pbdemo-b-$ID
DATA=$(mktemp -d /tmp/pbdemo.XXXXXX)
STEP="start"

cleanup() {
    for ns in "$A" "$B" "$HOST"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$DATA"
}
# Whatever fails, the terminal says which step it was (set -e alone would end silently).
trap 'echo "demo: step \"$STEP\" failed; everything it made is removed" >&2' ERR
trap cleanup EXIT

# The first plugin of the conflist, as a runtime derives it (name and cniVersion inserted),
# with the IPAM store moved into a temp dir.
STEP="read $CONFLIST"
CONF=$("$BIN/python" - "$CONFLIST" "$DATA" <<'PY'
import json, sys
conflist = json.load(open(sys.argv[1]))
plugin = dict(conflist["plugins"][0], name=conflist["name"], cniVersion=conflist["cniVersion"])
plugin["ipam"]["dataDir"] = sys.argv[2]
plugin["ipam"]["ranges"] = [[{"subnet": "10.85.0.0/24"}]]
print(json.dumps(plugin))
PY
)

# cni VERB POD-NETNS CONTAINER-ID: the plugin's result on stdout; on failure its CNI error
# (code, msg, details) on stderr, and a non-zero status.
cni() {
    local out status=0
    out=$(ip netns exec "$HOST" env CNI_COMMAND="$1" CNI_CONTAINERID="$3" CNI_NETNS="/run/netns/$2" \
        CNI_IFNAME=eth0 CNI_PATH="$BIN" "$BIN/pybridge" <<<"$CONF") || status=$?
    if [ "$status" != 0 ]; then
        "$BIN/python" -c '
import json, sys
out, verb, status = sys.argv[1:]
try:
    e = json.loads(out)
    print("pybridge %s failed: %s (code %s)" % (verb, e.get("msg"), e.get("code")), file=sys.stderr)
    if e.get("details"):
        print("  details: %s" % e["details"], file=sys.stderr)
except ValueError:
    print("pybridge %s failed with exit status %s: %r" % (verb, status, out), file=sys.stderr)
' "$out" "$1" "$status"
        return "$status"
    fi
    [ -z "$out" ] || printf '%s\n' "$out"
}
pretty() { "$BIN/python" -m json.tool; }

STEP="make the host and pod netns"
for ns in "$HOST" "$A" "$B"; do ip netns add "$ns"; done
STEP="ADD pod A"; echo "== $STEP"; RA=$(cni ADD "$A" demo-a); echo "$RA" | pretty
STEP="ADD pod B"; echo "== $STEP"; RB=$(cni ADD "$B" demo-b); echo "$RB" | pretty
IP_B=$(echo "$RB" | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["ips"][0]["address"].split("/")[0])')
PING=ping; command -v ping >/dev/null || PING="busybox ping"
STEP="ping pod B ($IP_B) from pod A"; echo "== $STEP"
ip netns exec "$A" $PING -c 3 -W 2 "$IP_B"
STEP="DEL both"; echo "== $STEP"
cni DEL "$A" demo-a && cni DEL "$B" demo-b
echo "== left in the IPAM store: $(ls "$DATA/pybridge" | grep -cv -e lock -e last_reserved) reservations"
