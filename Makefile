# pybridge: `make demo` shows the plugin working, `make test` runs the whole suite.
PYTHON      ?= python3
VENV        ?= .venv
CNI_BIN_DIR ?= /opt/cni/bin
PREFIX      ?= /opt/pybridge
PY          := $(VENV)/bin/python

.PHONY: venv install demo test lint unit netns clean

$(PY):
	$(PYTHON) -m venv $(VENV)

venv: $(PY)
	$(PY) -m pip install -q -e '.[test]'

# A venv under $(PREFIX), and two launchers in $(CNI_BIN_DIR) that start its interpreter by
# absolute path with -I (never the pyenv shim on PATH, no PYTHON* variables from the runtime).
install:
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q .
	install -d $(CNI_BIN_DIR)
	set -e; for entry in pybridge:cni_plugin pyipam:ipam; do \
	    name=$${entry%%:*}; module=$${entry#*:}; \
	    printf '#!%s -I\nfrom %s.__main__ import main\nmain()\n' \
	        "$$(readlink -f $(PREFIX)/bin/python)" "$$module" > $(CNI_BIN_DIR)/.$$name.tmp; \
	    chmod 0755 $(CNI_BIN_DIR)/.$$name.tmp; \
	    mv -f $(CNI_BIN_DIR)/.$$name.tmp $(CNI_BIN_DIR)/$$name; \
	done
	@echo "installed pybridge and pyipam into $(CNI_BIN_DIR)"

demo: venv
	bash scripts/demo.sh

lint: venv
	$(VENV)/bin/ruff check cni_plugin ipam tests
	$(VENV)/bin/mypy --strict cni_plugin ipam

unit: venv
	$(VENV)/bin/pytest -q tests/unit

netns: venv
	$(VENV)/bin/pytest -q tests/netns

# pytest exits 5 when it ran no test: that is a failure here too (make stops on any non-zero).
test: lint
	$(VENV)/bin/pytest -q -rs tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
