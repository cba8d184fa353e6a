# The two set-up commands of inhouse. Both work on a fresh machine: they create .venv if missing,
# install torch first (TORCH_SPEC, default torch==2.13.0, which takes the CPU wheel here; skipped when
# the venv already has a torch), then the package, then run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
GPT_OSS_SPEC ?= gpt-oss==0.0.9
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?= --durations=15

.PHONY: run test setup setup-test system-deps system-test-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	@touch $@

$(VENV)/.installed: pyproject.toml setup.py $(wildcard inhouse/kernels/cpu/csrc/*.[ch]) $(VENV)/.torch
	$(PIP) install -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e ".[test]"
	# The reference implementation, as a test-only oracle (see README, Tests).
	$(PIP) install --no-deps --ignore-requires-python "$(GPT_OSS_SPEC)"
	@touch $@

setup: $(VENV)/.installed system-deps
setup-test: $(VENV)/.installed-test system-test-deps

# System packages the tests need: PostgreSQL's server binaries (the PostgreSQL tests start their
# own throwaway server), Debian's chromium (the web UI's tests drive it with Playwright; no browser
# is downloaded) and bubblewrap (the python tool's sandbox). Installed with apt-get where missing
# and we may (root, Debian).
system-test-deps: system-deps
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	  else echo "PostgreSQL server binaries are missing: apt-get install postgresql"; fi; }
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "chromium is missing (the web UI tests will fail): apt-get install chromium"; fi; }

# What the server itself uses: bubblewrap for the python tool (without it the tool is refused).
system-deps:
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap; \
	  else echo "bubblewrap is missing (the python tool will be refused): apt-get install bubblewrap"; fi; }

# The main job: the OpenAI-compatible server on the embedded demo model (no download needed; the
# first run trains it, a few minutes, then it is cached).
# HOST/PORT/MODEL override: make run MODEL=/path/to/gpt-oss-20b PORT=8080
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?=
# The demo judges its sample policy (flagged in the audit log; POST /v1/moderations answers).
run: setup
	$(if $(MODEL),,$(VENV)/bin/inhouse demo build)
	$(VENV)/bin/inhouse serve --host $(HOST) --port $(PORT) $(if $(MODEL),--model $(MODEL),--policy "$$($(VENV)/bin/inhouse demo policy)")

# The default suite: everything but @slow and @gpu tests.
test: setup-test
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
