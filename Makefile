# pybridge: `make demo` shows the plugin working, `make test` runs the whole suite.
PYTHON      ?= python3
VENV        ?= .venv
CNI_BIN_DIR ?= /opt/cni/bin
PREFIX      ?= /opt/pybridge
PY          := $(VENV)/bin/python

.PHONY: venv deps packages packages-demo install demo test lint unit netns bench bench-netpol stress interop e2e \
	cnitool clean bundle kind-up kind-e2e kind-down kind-sim kind-sim-netpol

# `make demo` and `make test` set the machine up themselves: scripts/deps.sh checks for root and
# installs the Debian packages that are missing (nothing, and no apt-get update, when all are
# there), then the venv is (re)installed only when pyproject.toml changed since. Prerequisites are
# made left to right, so the root check comes before anything is touched.
packages:
	@PYTHON=$(PYTHON) bash scripts/deps.sh test "$(or $(MAKECMDGOALS),deps)"
packages-demo:
	@PYTHON=$(PYTHON) bash scripts/deps.sh demo "$(or $(MAKECMDGOALS),demo)"
deps: packages venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# lint and unit need only this (no root, no packages).
VENV_STAMP := $(VENV)/.installed
venv: $(VENV_STAMP)
$(VENV_STAMP): pyproject.toml | $(PY)
	@echo "installing pybridge and its test tools from PyPI into $(VENV) (quiet; minutes the first time)"
	$(PY) -m pip install -q -e '.[test,bundle,kind]'
	touch $@

# A venv under $(PREFIX); in $(CNI_BIN_DIR) the compiled client that forwards to the agent, and
# behind it, in $(PREFIX)/libexec, launchers that start the venv's interpreter by absolute path
# with -I -S (never the pyenv shim on PATH) and serve the call in-process when no agent runs. The
# manual goes to $(PREFIX)/share/doc/pybridge, where the systemd units' Documentation= points.
install:
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q .
	install -d $(PREFIX)/share/doc/pybridge/docs
	install -m 0644 README.md $(PREFIX)/share/doc/pybridge/ && install -m 0644 docs/*.md $(PREFIX)/share/doc/pybridge/docs/
	$(PREFIX)/bin/python -I -m cni_plugin.install --bin-dir $(CNI_BIN_DIR) --libexec-dir $(PREFIX)/libexec

demo: packages-demo venv
	bash scripts/demo.sh

lint: venv
	$(VENV)/bin/ruff check cnikit cni_plugin ipam tests bench scripts testbed
	$(VENV)/bin/mypy --strict cnikit cni_plugin ipam bench scripts

unit: venv
	$(VENV)/bin/pytest -q tests/unit

netns: deps
	$(VENV)/bin/pytest -q tests/netns

# NetworkPolicy figures (root, bench/netpol.py): 500 pods x 200 policies, convergence, event ->
# rules latency over 301 events, ruleset size at 50/200/500 pods, RSS at 5,000 pods. Prints JSON.
bench-netpol: deps
	$(PY) bench/netpol.py

# The long reliability run (crash trials x200, churn x1000, fuzz x100k, agent fds before/after
# 1000 bad frames, ADD p50/p99 idle and with 200 slow connections open, lock-FIFO time to error);
# `make test` runs the short versions. The figures are appended to build/reliability.jsonl. -v: each
# test's name as it starts and its result as it ends, so a long run shows where it is.
stress: deps
	$(PY) -m pip install -q -e '.[test,fuzz]' || echo 'atheris not installed: its run is skipped'
	mkdir -p build
	PYBRIDGE_STRESS=1 PYBRIDGE_FIGURES=build/reliability.jsonl $(VENV)/bin/pytest -v -rs --durations=10 tests/reliability

interop: deps
	$(VENV)/bin/pytest -q tests/interop

# The containerd tier alone (root): docs/testing.md.
e2e: deps
	$(VENV)/bin/pytest -v -rs -m e2e tests/e2e

# cnidrive, the cnitool-style libcni driver of tests/interop, built offline in GOPATH mode against
# Debian's golang-github-appc-cni-dev (libcni 1.1.2). The binary stays in build/, never committed.
GO_ENV := GO111MODULE=off GOPATH=$(CURDIR)/build/gopath:/usr/share/gocode GOCACHE=$(CURDIR)/build/gocache \
	CGO_ENABLED=0 GOFLAGS=
cnitool:
	cd tests/interop/cnidrive && $(GO_ENV) go build -o $(CURDIR)/build/cnidrive .
	@echo "built build/cnidrive (see docs/testing.md: cnitool by hand)"

# The frozen bundle (PyInstaller one-dir) for nodes without Python, e.g. kind: dist/pybridge/ with
# the executable `pybridge` and `pyipam` -> pybridge beside it. Rebuilt only when a source changed;
# the flock keeps two `make test` in one tree from building into the same dist/ at once.
BUNDLE         := dist/pybridge
BUNDLE_SOURCES := $(shell find cnikit cni_plugin ipam -name '*.py') cni_plugin/agent/client.c deploy/bundle/pybridge.spec \
	pyproject.toml
bundle: venv $(BUNDLE)/pybridge
$(BUNDLE)/pybridge: $(BUNDLE_SOURCES)
	@mkdir -p build
	flock build/.bundle.lock $(VENV)/bin/pyinstaller --noconfirm --log-level WARN --distpath dist \
		--workpath build/pyinstaller deploy/bundle/pybridge.spec
	ln -sfn pybridge $(BUNDLE)/pyipam
	$(PY) -I -c 'from cni_plugin.install import build_client; build_client("$(BUNDLE)/cni-client", "/opt/pybridge/current")'
	touch $@

# kind (needs docker, kind, kubectl; not on the CI machines): see docs/kubernetes.md.
KIND_CLUSTER ?= pybridge
KIND_CONFIG  ?= kind-config.yaml
IMAGE        ?= pybridge:dev
kind-up:
	kind create cluster --name $(KIND_CLUSTER) --config $(KIND_CONFIG)
	docker build -f deploy/Dockerfile -t $(IMAGE) .
	kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)
	kubectl --context kind-$(KIND_CLUSTER) apply -f deploy/pybridge.yaml
	kubectl --context kind-$(KIND_CLUSTER) wait --for=condition=Ready nodes --all --timeout=180s

kind-e2e:
	KUBECTL="kubectl --context kind-$(KIND_CLUSTER)" bash deploy/e2e/kind-e2e.sh

kind-down:
	kind delete cluster --name $(KIND_CLUSTER)

# kind without docker (root; apt-get install containerd runc buildah debootstrap): the image from
# deploy/Dockerfile built by buildah, three nodes from kind-config.yaml, the DaemonSet of
# deploy/pybridge.yaml through each node's CRI, pods on them. docs/kubernetes.md. `make test` runs it too.
kind-sim: deps
	$(VENV)/bin/pytest -q -rs tests/simcluster

# The NetworkPolicy cases and event benchmark across the three simulated nodes alone (docs/networkpolicy.md); `make kind-sim` runs them too. PYBRIDGE_NETPOL_ROUNDS=N: more benchmark rounds.
kind-sim-netpol: deps
	$(VENV)/bin/pytest -q -rs -s tests/simcluster/test_netpol.py

# pytest exits 5 when it ran no test: that is a failure here too (make stops on any non-zero).
# deps first (root, packages, venv), then lint and the unit tier: they never wait for PyInstaller.
test: deps lint unit bundle
	$(VENV)/bin/pytest -q -rs tests --ignore=tests/unit

# The benchmark against the reference plugins (root): writes bench/results.md; several minutes
# (docs/performance.md).
bench: deps
	$(PY) bench/run.py --write --cri-pods 30 $(if $(wildcard dist/pybridge/pybridge),--bundle dist/pybridge/pybridge)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
