# make run: set up .venv and run the service on config.yaml.  make test: set up and run the tests.
# make once DIR=folder: classify a folder once (default: inbox) into results/once_results.json.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NEW_ENOUGH := -c 'import sys; sys.exit(sys.version_info < (3, 11))'

.PHONY: run test lint format soak once folders

# The editable install in compat mode puts the checkout itself on sys.path, so that `python -m
# watcher` run from a folder that holds a model/ or train/ folder of its own still imports this one.
$(STAMP): pyproject.toml Makefile
	@$(PY) $(NEW_ENOUGH) 2>/dev/null || { test -n "$(PYTHON)" || { echo "gender-watcher needs Python 3.11 or newer, and no python3 was found. Run: make PYTHON=/path/to/python3.11 ..."; exit 1; }; rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	@$(PY) $(NEW_ENOUGH) || { echo "gender-watcher needs Python 3.11 or newer; found $$($(PY) -V). Run: make PYTHON=/path/to/python3.11 ..."; rm -rf $(VENV); exit 1; }
	$(PY) -m pip install -q -e '.[dev,ray]' --config-settings editable_mode=compat
	touch $(STAMP)

folders:
	mkdir -p inbox done failed results

run: $(STAMP) folders
	$(PY) -m watcher --config config.yaml

once: $(STAMP) folders
	$(PY) -m watcher --config config.yaml --once $(or $(DIR),inbox) --output results/once_results.json --details results/once_details.jsonl

test: $(STAMP)
	$(PY) -m pytest -q

soak: $(STAMP)
	$(PY) -m pytest -q -m soak

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
