# Everything starts from a bare Python 3.11 with pip: no root, nothing pre-installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench proto clean serve docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install when the dependency list changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[envoy,dev]'
	touch $(STAMP)

# The whole stack in one command: extauth (memory store), Envoy, an echo upstream and two
# web pages (an allowed and a refused origin). Ctrl-C stops everything.
demo: $(STAMP)
	$(PY) -m extauth demo $(DEMO_ARGS)

serve: $(STAMP)
	$(VENV)/bin/extauth serve -c examples/extauth.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check extauth tests bench
	$(VENV)/bin/mypy extauth

test: lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest -q -m "not e2e and not browser" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run.py

# docs/configuration.md from the config schema (tests/test_configdoc.py fails when it is stale).
docs: $(STAMP)
	$(PY) -m extauth.configdoc docs/configuration.md

proto: $(STAMP)
	$(PY) -m extauth._protogen

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
