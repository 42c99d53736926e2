# The README's commands. Each target bootstraps .venv on a fresh machine and
# reuses it afterwards (the stamp is refreshed only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv browser demo test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/python -m t2tvit demo

# The page's browser test drives Debian's chromium and its chromedriver (never a browser download).
# Installed when missing and apt-get can run without a password (root, or sudo -n); otherwise that
# one test is skipped and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null; then echo "no apt-get: the browser test will be skipped"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null \
		|| echo "installing chromium failed: the browser test will be skipped"; \
	elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq chromium chromium-driver >/dev/null \
		|| echo "installing chromium failed: the browser test will be skipped"; \
	else echo "chromium is not installed and apt-get needs a password: the browser test will be skipped"; fi

test: venv browser
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python benchmarks/compare.py -o benchmarks/RESULTS.md --readme README.md

lint: venv
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
