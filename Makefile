# Quick start:  make run   (hello-world guest + capability summary)
#               make test  (the test suite on this machine's /dev/kvm, one Python)
# More:         make dist (wheel + sdist), make docs (API reference),
#               make lint (ruff), make typecheck (mypy --strict); `bash .ci/run` is CI.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python

$(VPY): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(VPY)

.PHONY: run test dev dist docs lint typecheck clean
run: $(VPY)
	$(VPY) -m pykvm demo

test: $(VPY)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

dev: $(VPY)
	$(VPY) -m pip install -q -e '.[dev]'

dist: dev
	rm -rf dist && $(VPY) -m build --outdir dist .

docs: dev
	$(VPY) -m sphinx -E -W --keep-going -b html docs docs/_build/html

lint: dev
	$(VENV)/bin/ruff check pykvm tests

typecheck: dev
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .ci-venv build dist docs/_build *.egg-info
