# Two commands for a fresh machine (see README.rst):
#   make run    install into .venv and run the daemon with its defaults
#   make test   install into .venv and run every check and test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable '.[test,redis,postgresql,metrics]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/postfix-mtasts serve

lint: $(STAMP)
	$(BIN)/ruff check postfix_mtasts tests bench
	$(BIN)/mypy postfix_mtasts

test: lint
	$(BIN)/python -m pytest
