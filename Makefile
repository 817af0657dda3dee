# marslib: the two commands of README.md are `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-local test soak bench lint clean molecule install uninstall

setup:
	@scripts/bootstrap.sh

demo: setup
	$(PY) bin/mars-demo

demo-local: setup
	$(PY) bin/mars-demo-local

test: setup
	$(VENV)/bin/ruff check marslib tests bench ansible/ansible_collections/marslib/mars/plugins \
		bin/mars-demo bin/mars-demo-local bin/mars-lab bin/mars-app bin/_checkout.py bin/marsadm bin/marsd
	scripts/collection-sanity.sh
	scripts/collection-lint.sh
	$(PY) -m pytest -q -rs --durations=40

# every Molecule scenario (`make test` runs `default`, `make soak` also `handover`), against the
# collection built and installed from this checkout (scripts/install-collection.sh)
MOLECULE_COLLECTIONS := $(CURDIR)/.build/collections
molecule: setup
	rm -rf $(MOLECULE_COLLECTIONS) && scripts/install-collection.sh $(MOLECULE_COLLECTIONS)
	cd $(CURDIR) && PATH=$(CURDIR)/$(VENV)/bin:$$PATH MARS_COLLECTIONS_PATH=$(MOLECULE_COLLECTIONS) \
		$(VENV)/bin/molecule test --all

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

# `make install [PREFIX=/usr/local]`: marsadm, marsd and mars-app in PREFIX/bin, small sh
# wrappers that run this checkout with its venv (so the checkout must stay where it is);
# `make uninstall` removes exactly those wrappers (a file there that is not one is left).
PREFIX ?= /usr/local
INSTALL_COMMANDS := marsadm marsd mars-app
WRAPPER_MARK := written by marslib's make install

install: $(PY)
	@install -d "$(DESTDIR)$(PREFIX)/bin"
	@for c in $(INSTALL_COMMANDS); do \
	  dest="$(DESTDIR)$(PREFIX)/bin/$$c"; \
	  if [ -e "$$dest" ] && ! grep -qs "$(WRAPPER_MARK)" "$$dest"; then \
	    echo "install: $$dest exists and is not a marslib wrapper: left alone" >&2; exit 1; fi; \
	  printf '%s\n' '#!/bin/sh' \
	    "# $$c, $(WRAPPER_MARK) from $(CURDIR); make uninstall removes it" \
	    "exec '$(CURDIR)/$(VENV)/bin/python' '$(CURDIR)/bin/$$c' \"\$$@\"" >"$$dest.tmp" && \
	  chmod 755 "$$dest.tmp" && mv -f "$$dest.tmp" "$$dest" && echo "installed $$dest"; \
	done

$(PY):  # a checkout without its venv yet: what make setup does
	@scripts/bootstrap.sh

uninstall:
	@for c in $(INSTALL_COMMANDS); do \
	  dest="$(DESTDIR)$(PREFIX)/bin/$$c"; \
	  if grep -qs "$(WRAPPER_MARK)" "$$dest"; then rm -f "$$dest" && echo "removed $$dest"; \
	  elif [ -e "$$dest" ]; then echo "uninstall: $$dest is not a marslib wrapper: left alone" >&2; \
	  fi; \
	done
