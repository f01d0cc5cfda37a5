# Set-up on a fresh machine is `make demo` or `make test`: both create and
# reuse .venv, install almanet editable with its compiled speedups and the
# extras they need, and rebuild when a .pyx or the build files change.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install test test-pure test-pythons lint docs demo bench wheels clean

install: $(INSTALLED)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(INSTALLED): $(BIN)/python pyproject.toml setup.py $(wildcard almanet/_speedups/*.pyx)
	$(BIN)/python -m pip install --quiet -e '.[test,bench,lint,docs]'
	touch $@

lint: $(INSTALLED)
	$(BIN)/ruff check almanet tests benchmarks examples setup.py
	$(BIN)/ruff format --check almanet tests benchmarks examples setup.py
	$(BIN)/mypy --strict almanet

# The documentation site from docs/ (mkdocs.yml, Material), warnings as errors,
# into site/; `$(BIN)/mkdocs serve` shows it while it is edited. The variable
# quiets Material's banner about its end of life (May 2027), printed every build.
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint docs
	$(BIN)/python -m pytest

# The suite again on the pure twins (CI runs it after `make test`).
test-pure: $(INSTALLED)
	ALMANET_NO_EXTENSIONS=1 $(BIN)/python -m pytest -q

# The suite again with CPython 3.13 from pyenv, and a chosen part of it with 3.10 and 3.12
# (tools/test-pythons; CI runs it after `make test`).
test-pythons:
	tools/test-pythons

demo: $(INSTALLED)
	$(BIN)/python examples/demo.py

# pytest-benchmark's micro and client benchmarks, then `almanet bench` (end to
# end, beside NATS: nats-server comes from Debian's package when apt-get can).
# Both measure nsqd beside the embedded broker when they find it: nsqd and NSQ's
# Go bench clients come from ../shared/nsq when it is there, as in .ci/run.
SHARED_NSQ := $(abspath ../shared/nsq)
bench: export PATH := $(if $(wildcard $(SHARED_NSQ)/nsqd),$(SHARED_NSQ):)$(PATH)
bench: $(INSTALLED)
	$(BIN)/python -m pytest benchmarks --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,mean,ops,rounds
	@command -v nats-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq nats-server >/dev/null; } || \
		echo "nats-server is not installed: the bench leaves the NATS and JetStream columns empty"
	$(BIN)/almanet bench

# The release files, from a clean copy of HEAD (or of `make wheels REV=...`),
# without docker: the sdist, and a manylinux wheel for each CPython 3.10-3.13
# under pyenv, stripped by `auditwheel repair --strip`, its tag checked with
# `auditwheel show`, installed into a fresh venv and tested there; `twine check`
# on them all. They land in dist/ only when all passed (tools/check-wheels).
wheels:
	tools/check-wheels $(REV)

clean:
	rm -rf build dist site *.egg-info .venvs almanet/_speedups/*.c almanet/_speedups/*.so
