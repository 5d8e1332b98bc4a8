#!/bin/bash
# The Debian packages `make demo` (deps.sh demo) or every test tier (deps.sh test) needs.
# Idempotent: when all are installed it only asks dpkg and changes nothing (no apt-get update).
# Usage: deps.sh demo|test [MAKE-GOAL]. PYBRIDGE_NO_PACKAGES=1 skips the packages (a machine
# without apt whose owner installed the equivalents by hand).
set -euo pipefail
MODE=${1:?usage: deps.sh demo|test [goal]}
GOAL=${2:-$MODE}
PYTHON=${PYTHON:-python3}

# demo: `ip`, `nft` for the demo conflist's ipMasq, busybox's ping, make itself.
DEMO=(iproute2 nftables busybox-static make)
# test: what the tiers exec. Go + the two Debian Go sources build tests/interop's libcni and
# go-cni drivers offline; containerd + runc: tests/e2e and kind-sim; buildah + debootstrap:
# kind-sim's images and tests/bundle's root; gcc: the compiled client (make install, bundle);
# openssl: kind-sim's API server certificate; the reference plugins: interop and bench; git: the
# unit tier's docs tests list the repository with `git ls-files` (a minimal Debian has none).
TEST=("${DEMO[@]}" iptables containernetworking-plugins golang-go golang-github-appc-cni-dev
      golang-github-containerd-go-cni-dev containerd runc debootstrap buildah openssl gcc libc6-dev git)
# The Prometheus server tests/netns/test_prometheus.py starts, without its Recommends
# (node-exporter would start a service).
TEST_NO_RECOMMENDS=(prometheus)

case $MODE in
    demo) WANT=("${DEMO[@]}"); WANT_BARE=() ;;
    test) WANT=("${TEST[@]}"); WANT_BARE=("${TEST_NO_RECOMMENDS[@]}") ;;
    *) echo "usage: deps.sh demo|test [goal]" >&2; exit 2 ;;
esac
# The venv needs `python3 -m venv` with ensurepip: on Debian that is python3-venv (a pyenv or
# distribution python that has it needs nothing).
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || WANT+=(python3 python3-venv)

if [ "$(id -u)" != 0 ]; then
    echo "run as root (sudo make $GOAL): it makes network namespaces and installs what is missing" >&2
    exit 1
fi
[ "${PYBRIDGE_NO_PACKAGES:-}" = 1 ] && exit 0

# Installed = dpkg's status "installed" for the package; anything else (absent, removed, half
# configured) is missing.
missing() {
    local installed
    installed=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "$@" 2>/dev/null \
        | awk '$2 == "installed" {print $1}') || true
    for p in "$@"; do grep -qx -- "$p" <<<"$installed" || echo "$p"; done
}

if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
    echo "this machine has no apt-get/dpkg: install the equivalents of these Debian packages," \
         "${WANT[*]} ${WANT_BARE[*]}, then run PYBRIDGE_NO_PACKAGES=1 make $GOAL" >&2
    exit 1
fi
mapfile -t NEED < <(missing "${WANT[@]}")
mapfile -t NEED_BARE < <(if [ ${#WANT_BARE[@]} -gt 0 ]; then missing "${WANT_BARE[@]}"; fi)
[ ${#NEED[@]} -eq 0 ] && [ ${#NEED_BARE[@]} -eq 0 ] && exit 0

echo "installing: ${NEED[*]} ${NEED_BARE[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
[ ${#NEED[@]} -eq 0 ] || apt-get install -y -qq "${NEED[@]}" >/dev/null
[ ${#NEED_BARE[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${NEED_BARE[@]}" >/dev/null
