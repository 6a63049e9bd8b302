# Two commands for a fresh machine (see README.rst):
#   make run    install into .venv and run the daemon with its defaults
#   make test   install into .venv and run every check and test
#   make deb    build the Debian package into dist/ (Debian 12: apt-get install
#               debhelper dh-virtualenv python3-dev python3-venv libffi-dev)
# Everything installs at the exact versions in constraints.txt; `make lock`
# refreshes that file from the newest releases.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := test,redis,postgresql,metrics
PIP_PINNED := $(BIN)/python -m pip install --quiet --constraint constraints.txt

.PHONY: run test lint install lock deb

$(STAMP): setup.cfg setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_PINNED) pip setuptools wheel
	$(PIP_PINNED) --no-build-isolation --editable '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/postfix-mtasts serve

lint: $(STAMP)
	$(BIN)/ruff check postfix_mtasts tests bench
	$(BIN)/mypy postfix_mtasts

test: lint
	$(BIN)/python -m pytest

# A fresh venv with the newest releases that setup.cfg allows, frozen.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	.lock-venv/bin/python -m pip install --quiet '.[$(EXTRAS)]'
	{ sed -n '1,/^$$/p' constraints.txt; \
	  .lock-venv/bin/python -m pip freeze --all --exclude postfix-mtasts; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .lock-venv build

# The Debian package (debian/rules), with its .buildinfo and .changes, in dist/.
DEB_VERSION = $(shell dpkg-parsechangelog --show-field Version)
DEB_ARCH = $(shell dpkg-architecture --query DEB_HOST_ARCH)
DEB_BASE = dist/postfix-mtasts_$(DEB_VERSION)_$(DEB_ARCH)
deb:
	mkdir -p dist
	dpkg-buildpackage --build=binary --unsigned-source --unsigned-changes \
	    --buildinfo-option=-udist --buildinfo-file=$(DEB_BASE).buildinfo \
	    --changes-option=-udist --changes-file=$(DEB_BASE).changes
	@ls -l $(DEB_BASE).deb
