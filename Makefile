# Quick start:  make run   (hello-world guest + capability summary)
#               make test  (the test suite on this machine's /dev/kvm)
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python

$(VPY): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $(VPY)

.PHONY: run test clean
run: $(VPY)
	$(VPY) -m pykvm demo

test: $(VPY)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
