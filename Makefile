# The two quick-start commands: `make serve` and `make test` (each installs what it needs first).
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev

.PHONY: serve test install lint

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first (it lies on local disk here); pyproject asks only torch>=2.4.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(VENV)/bin/convoy serve

test: $(VENV)/.installed
	bash .ci/install_perf_analyzer.sh >/dev/null
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
