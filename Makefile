# marslib: the two commands of README.md are `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-local test soak bench lint clean molecule

setup:
	@scripts/bootstrap.sh

demo: setup
	$(PY) bin/mars-demo

demo-local: setup
	$(PY) bin/mars-demo-local

test: setup
	$(VENV)/bin/ruff check marslib tests bench ansible/library ansible/module_utils \
		bin/mars-demo bin/mars-demo-local bin/mars-lab bin/mars-app
	$(PY) -m pytest -q -rs

# every Molecule scenario (the test suite runs `default` and `handover`)
molecule: setup
	cd $(CURDIR) && PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/molecule test --all

soak: setup
	$(PY) -m pytest -q -rs -m soak

bench: setup
	$(PY) bench/write_path.py
	$(PY) bench/writeback_order.py
	$(PY) bench/replication.py
	$(PY) bench/sync.py
	$(PY) bench/handover.py --far

lint: setup
	$(VENV)/bin/ruff check marslib tests bench
	$(VENV)/bin/mypy marslib
