# hutch — the two set-up commands are `make demo` and `make test` (see README.md).
# Both create the virtualenv at .venv/ and run `hutch setup` (packages, kernel, agent, images; cached).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
HUTCH  := $(VENV)/bin/hutch
PYTEST_ARGS ?=

.PHONY: venv setup demo test lint check bench clean-venv

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "python3 venv support missing; installing python3-venv"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed

setup: venv
	$(HUTCH) setup

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/mypy

check: lint test

bench: setup
	$(PY) bench/boot.py
	$(PY) bench/exec.py

clean-venv:
	rm -rf $(VENV)
