# Every workflow of Shoal. `make run` and `make test` install into .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/shoal/v1/*.proto)
GEN_DIR := clients/python
# A third-party executor and tools, installed so that the tests exercise their entry points.
EXAMPLE := examples/shoal-example

.PHONY: dev reinstall-pkg run test unit integration chaos lint typecheck protos protos-check bench dist dist-test image image-context clean

dev: $(STAMP)

$(STAMP): pyproject.toml $(EXAMPLE)/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --config-settings editable_mode=strict -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -e $(EXAMPLE)
	touch $(STAMP)

# Re-running the editable install picks up new modules (strict mode links files one by one).
reinstall-pkg: $(STAMP)
	@$(BIN)/python -m pip install -q --no-deps --config-settings editable_mode=strict -e . >/dev/null

# gRPC on 127.0.0.1:7070; `make run PORT=7171` (or SHOAL_COORDINATOR_LISTEN=host:port) for another.
run: $(STAMP) reinstall-pkg
	$(BIN)/shoal up --demo $(if $(PORT),--listen 127.0.0.1:$(PORT))

# tests/dist builds the executable (minutes): `make dist-test` runs them. The suite runs on
# two pytest-xdist workers (most tests wait on processes and sockets, not on a core); tests of
# one group share a worker (see tests/workers.py). `make test JOBS=0` runs it in this
# process. The slowest 25 tests are listed at the end. Tests marked `whole_machine` measure
# the machine's CPU: they run afterwards, alone.
JOBS ?= 2
test: $(STAMP) reinstall-pkg lint protos-check
	$(BIN)/python -m pytest -q tests --ignore=tests/dist -n $(JOBS) --dist loadgroup \
	  -m 'not whole_machine' --durations=25
	$(BIN)/python -m pytest -q tests --ignore=tests/dist -m whole_machine

unit: $(STAMP) reinstall-pkg
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP) reinstall-pkg
	$(BIN)/python -m pytest -q tests/integration

# Faults on real processes (kill -9, partitions, SIGSTOP, lost answers); needs root, ip, iptables.
chaos: $(STAMP) reinstall-pkg
	$(BIN)/python -m pytest -q tests/chaos

# mypy checks the package through its editable-install tree, where the three folders are one `shoal`.
lint: $(STAMP) reinstall-pkg
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd build/__editable__.shoal-*/ && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p shoal
	$(BIN)/mypy tests $(wildcard bench/*.py)

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=$(GEN_DIR) --grpc_python_out=$(GEN_DIR) \
	  --mypy_out=$(GEN_DIR) --mypy_grpc_out=$(GEN_DIR) \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  $(PROTOS)

# Fails when the checked-in generated code differs from what protos/ generates.
protos-check: $(STAMP)
	@tmp=$$(mktemp -d) && \
	$(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  $(PROTOS) && \
	diff -r -x __init__.py -x __pycache__ $$tmp/shoal/v1 $(GEN_DIR)/shoal/v1 && rm -rf $$tmp && echo "generated code is up to date"

# Every benchmark at its default size (on 2 cores, a quarter of an hour or more), then
# bench/results/report.md and latency.png. memory.py leaves its store of 1M queued tasks for
# recovery.py. A failed benchmark does not stop the others, but fails the target; Ctrl-C stops all.
bench: $(STAMP) reinstall-pkg
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || \
	  $(BIN)/python -m pip install -q --config-settings editable_mode=strict -e '.[dev,bench]'
	@store=$$(mktemp -d /tmp/shoal-bench-store.XXXXXX) && trap 'rm -rf "$$store"' EXIT && rc=0 && \
	run() { echo "== $$*"; $(BIN)/python "$$@"; s=$$?; [ $$s -ne 130 ] || exit 130; [ $$s -eq 0 ] || rc=1; } && \
	run bench/scheduler.py; \
	run bench/throughput.py; \
	run bench/unary.py; \
	run bench/roundtrip.py; \
	run bench/memory.py --keep-data "$$store/data"; \
	run bench/recovery.py --data-dir "$$store/data"; \
	run bench/nodes.py; \
	run bench/floor.py; \
	run bench/templates.py; \
	run bench/report.py; \
	exit $$rc

# One self-contained executable of every `shoal` command: PyInstaller (one file), then staticx,
# so that it needs no libc or loader on the machine either.
DIST := dist/shoal-linux-x86_64
dist: $(DIST)

$(DIST): $(STAMP) pyproject.toml deploy/dist/shoal.spec deploy/dist/shoal_frozen.py $(shell find clients/python/shoal coordinator node -name '*.py' -o -name '*.pyi' -o -name '*.html')
	@$(BIN)/python -c 'import PyInstaller, staticx' 2>/dev/null || \
	  $(BIN)/python -m pip install -q --config-settings editable_mode=strict -e '.[dev,dist]'
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pyinstaller --noconfirm --log-level WARN \
	  --distpath build/dist --workpath build/pyinstaller deploy/dist/shoal.spec
	mkdir -p dist
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/staticx --strip build/dist/shoal $@.tmp
	chmod 755 $@.tmp && mv $@.tmp $@

# The image of deploy/docker (FROM scratch: no registry): `make image` → shoal:VERSION.
BUSYBOX ?= $(firstword $(wildcard /bin/busybox /usr/bin/busybox))
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image: image-context
	docker build -t shoal:$(VERSION) build/image

image-context: $(DIST)
	rm -rf build/image && mkdir -p build/image/rootfs/bin build/image/rootfs/etc build/image/home
	install -d -m 1777 build/image/rootfs/tmp
	cp $(DIST) build/image/rootfs/bin/shoal
	cp $(BUSYBOX) build/image/rootfs/bin/busybox
	for applet in $$($(BUSYBOX) --list); do \
	  [ "$$applet" = busybox ] || ln -s busybox build/image/rootfs/bin/$$applet; done
	echo 'shoal:x:10001:10001:shoal:/var/lib/shoal:/bin/sh' > build/image/rootfs/etc/passwd
	echo 'shoal:x:10001:' > build/image/rootfs/etc/group
	touch build/image/home/.keep
	cp deploy/docker/Dockerfile build/image/

# The executable's own tests (it is built once, then run where no Python is reachable).
dist-test: $(DIST)
	SHOAL_DIST=$(CURDIR)/$(DIST) $(BIN)/python -m pytest -q tests/dist

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
