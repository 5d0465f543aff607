# CloneBox fleet. `make help` lists the targets.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
IMAGES ?= /var/lib/clonebox/images

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## system packages, .venv with everything, buf, test guest (idempotent)

$(STAMP): pyproject.toml deploy/dev/install-system.sh deploy/dev/buf/package.json
	@if [ "$$(id -u)" = 0 ]; then bash deploy/dev/install-system.sh; \
	  else echo "install: not root, skipping system packages (run deploy/dev/install-system.sh as root)"; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	cd deploy/dev/buf && npm ci --silent --no-audit --no-fund
	touch $(STAMP)

hypervisor: install ## start virtlogd/libvirtd if none runs, build the test guest
	bash deploy/dev/start-libvirt.sh
	bash deploy/testguest/build.sh $(IMAGES)/testguest

demo: hypervisor ## install, then run two tiny VMs end to end through CLI, controller, agent and libvirt
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash deploy/dev/demo.sh

# make test runs the suite in three parts that together are every test (tests/conftest.py: --suite-part):
# the unit, integration and fuzz tests that never touch libvirt on TEST_WORKERS pytest-xdist workers, the
# Hypervisor contract suite on TEST_WORKERS workers a module each, then the real-fleet tiers (e2e, fault)
# one at a time. Fails if any part fails; a part that PYTEST_ARGS leaves empty (exit 5) counts as passed
# unless all are empty.
TEST_WORKERS ?= 2
PYTEST_RUN = CLONEBOX_FUZZ_EXAMPLES=$${CLONEBOX_FUZZ_EXAMPLES:-250} $(PY) -m pytest -q -rs --durations=25 -m "not full"

test: hypervisor ## install, then run every test suite but the minutes-long `full` ones (make test-full)
	$(PYTEST_RUN) -n $(TEST_WORKERS) --suite-part=parallel $(PYTEST_ARGS); p=$$?; \
	  $(PYTEST_RUN) -n $(TEST_WORKERS) --dist loadfile --suite-part=contract $(PYTEST_ARGS); c=$$?; \
	  $(PYTEST_RUN) --suite-part=serial $(PYTEST_ARGS); s=$$?; \
	  echo "make test: parallel part exit $$p, contract part exit $$c, serial part exit $$s"; \
	  if [ $$p = 5 ] && [ $$c = 5 ] && [ $$s = 5 ]; then exit 5; fi; \
	  for rc in $$p $$c $$s; do if [ $$rc != 0 ] && [ $$rc != 5 ]; then exit $$rc; fi; done

debian-guest: install ## build the Debian cloud-init guest image (mmdebstrap; cached)
	bash deploy/testguest/debian/build.sh $(IMAGES)/debian-guest

test-full: hypervisor debian-guest ## real cloud-init, SSH and network-config on a Debian guest (4-6 min under TCG)
	$(PY) -m pytest -q -rs -m full $(PYTEST_ARGS)

lint: install ## ruff, mypy --strict, import-linter, buf lint, generated-code drift
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check core agent controller cli tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	PY=$(PY) bash deploy/dev/buflint.sh
	$(MAKE) --no-print-directory check-gen

gen: install ## regenerate the API modules from proto/
	PY=$(PY) bash deploy/dev/genproto.sh

check-gen: install ## fail when generated code differs from proto/
	@tmp=$$(mktemp -d) && cp -r proto "$$tmp/before" && PY=$(PY) bash deploy/dev/genproto.sh >/dev/null && \
	  if diff -r "$$tmp/before" proto >/dev/null; then echo "check-gen: generated code is up to date"; rm -rf "$$tmp"; \
	  else diff -r "$$tmp/before" proto | head -20; rm -rf "$$tmp"; echo "check-gen: generated code drifted: run make gen"; exit 1; fi

fuzz: install ## long fuzzing run (10,000+ cases per service)
	CLONEBOX_FUZZ_EXAMPLES=10000 $(PY) -m pytest tests/fuzz -q

bench: hypervisor ## run the benchmarks (figures go to docs/benchmarks.md by hand)
	$(PY) benchmarks/run.py

.PHONY: help install hypervisor demo test debian-guest test-full lint gen check-gen bench
