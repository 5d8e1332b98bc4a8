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

# A venv under $(PREFIX), and launchers in $(CNI_BIN_DIR) that start its interpreter by absolute
# path with -I -S (never the pyenv shim on PATH) and forward to the agent when one runs.
install:
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q .
	$(PREFIX)/bin/python -m cni_plugin.install --bin-dir $(CNI_BIN_DIR)

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
