# hutch — the two set-up commands are `make demo` and `make test` (see README.md).
# Both create the virtualenv at .venv/ and run `hutch setup` (packages, kernel, agent, images; cached).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
HUTCH  := $(VENV)/bin/hutch
PYTEST_ARGS ?=

.PHONY: venv setup demo test test-deps bench-deps install-packages lint check bench clean-venv

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

# Test-only Debian packages: the real registry the image tests push to and pull from.
TEST_PACKAGES := docker-registry

# Bench-only: the baseline bench/images.py compares against.
BENCH_PACKAGES := $(TEST_PACKAGES) skopeo

test-deps:
	@$(MAKE) --no-print-directory install-packages PACKAGES="$(TEST_PACKAGES)"

bench-deps:
	@$(MAKE) --no-print-directory install-packages PACKAGES="$(BENCH_PACKAGES)"

install-packages:
	@missing=$$(for p in $(PACKAGES); do dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" -ne 0 ]; then echo "missing test packages: $$missing (sudo apt-get install $$missing)" >&2; exit 1; fi; \
	  echo "installing test packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: setup test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/mypy

check: lint test

bench: setup bench-deps
	$(PY) bench/boot.py
	$(PY) bench/exec.py
	$(PY) bench/images.py
	$(PY) bench/server.py

clean-venv:
	rm -rf $(VENV)
