# medfed — set-up and everyday commands. `make demo` and `make test` are the contract.
PYTHON ?= python3.11
VENV ?= .venv
# GPU users: make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.medfed-installed
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install browser demo test test-fast test-load bench lint clean

install: $(STAMP)

# Re-installs only when the project's dependencies change; quick when already done.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The console's browser tests drive Debian's Chromium (no browser download): installed with
# apt-get when missing (as root, else through sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing chromium and chromium-driver with apt-get (console browser tests)"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q \
	    chromium chromium-driver; }

demo: install
	$(BIN)/medfed pretrain --config configs/heart.yaml --out runs/demo/pretrain
	$(BIN)/medfed simulate --config configs/heart.yaml --bundle runs/demo/pretrain --out runs/demo/federated

test: install browser
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# the whole suite beside CPU hogs (1.5 per core): it must pass on a busy laptop too
test-load: install browser
	$(BIN)/python -m tests.under_load

bench: install
	$(BIN)/python -m benchmarks.run $(if $(QUICK),--quick,)

lint: install
	$(BIN)/ruff check common server client console medfed tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
