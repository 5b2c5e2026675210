# Two commands set up a fresh machine:
#   make demo   install DCF, start a gateway, deploy the SSD example and call it
#   make test   install DCF with its test tools and run every test
PYTHON ?= python3
VENV ?= .venv

.PHONY: install install-test demo test bench lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

install: $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e .

install-test: $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e '.[test,ray]'

demo: install
	VENV=$(VENV) bash scripts/demo.sh

test: install-test
	VENV=$(VENV) bash scripts/test.sh

bench: install-test
	$(VENV)/bin/python -m pip install --quiet -e '.[bench]' py-spy
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || true
	$(VENV)/bin/python -m bench

lint: install-test
	$(VENV)/bin/ruff check dcf tests bench examples
	$(VENV)/bin/ruff format --check dcf

clean:
	rm -rf $(VENV) .dcf-demo
