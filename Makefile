# The two quick-start commands: `make serve` and `make test` (each installs what it needs first).
#   make serve                          the demo models on 8000/8001/8002 (runtime install only)
#   make serve ARGS="--http-port 9000"  flags pass through to `convoy serve`
#   make serve SERVE_EXTRAS=            core only: the demo serves add_sub, says what the rest need
#   make test                           the dev and test toolchain, then the tests
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev
# What serving the demo needs: the text extra runs text_embedding (torch, transformers).
SERVE_EXTRAS ?= text
ARGS ?=

.PHONY: serve test install lint native-check typecheck

# The native front end's crates (server/native): a change to them rebuilds the extension.
NATIVE_SOURCES := $(shell find server/native -path server/native/target -prune -o \( -name '*.rs' -o -name 'Cargo.*' \) -print)
CARGO := cargo --quiet
NATIVE_MANIFEST := --manifest-path server/native/Cargo.toml

# pip's own warnings stay visible; its progress and notices do not.
PIP := $(PY) -m pip install -q --disable-pip-version-check

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip

# The CPU build of torch first where an extra needs it (it lies on local disk here); pyproject
# asks only torch>=2.4, so a CUDA build already installed is kept.
$(VENV)/.installed: pyproject.toml setup.py $(NATIVE_SOURCES) | $(VENV)/bin/python
	$(PIP) torch==2.13.0
	$(PIP) -e '.[$(EXTRAS)]'
	touch $@ $(VENV)/.runtime

$(VENV)/.runtime: pyproject.toml setup.py $(NATIVE_SOURCES) | $(VENV)/bin/python
	$(if $(filter text torch,$(subst $(comma), ,$(SERVE_EXTRAS))),$(PIP) torch==2.13.0)
	$(PIP) -e '.$(if $(SERVE_EXTRAS),[$(SERVE_EXTRAS)])'
	touch $@

comma := ,

install: $(VENV)/.installed

serve: $(VENV)/.runtime
	$(VENV)/bin/convoy serve $(ARGS)

# The Rust crates' own tests and lints (the bindings crate is linted, its logic is tested
# through Python): what CI runs besides pytest. The tests build in release, beside the
# extension pip just built, so its dependencies are compiled once.
native-check: $(VENV)/.installed
	PYO3_PYTHON=$(abspath $(PY)) $(CARGO) test --release $(NATIVE_MANIFEST) -p convoy-wire
	PYO3_PYTHON=$(abspath $(PY)) $(CARGO) clippy $(NATIVE_MANIFEST) --all-targets -- -D warnings

test: $(VENV)/.installed native-check
	bash .ci/install_perf_analyzer.sh >/dev/null
	$(VENV)/bin/ruff check .
	$(PY) .ci/typecheck.py
	$(PY) -m pytest -q

# mypy, strict but for pyproject's burn-down list, on the package as it installs (.ci/typecheck.py).
typecheck: $(VENV)/.installed
	$(PY) .ci/typecheck.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
