# The README's commands. Each creates or reuses .venv and installs what it needs first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
BENCH_STAMP := $(VENV)/.bench-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup run lint test bench soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $(BENCH_STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/deepspm run

# static checks (configured in pyproject.toml): ruff's lint rules, then mypy over deepspm, benchmarks and tests
lint: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/mypy

test: $(STAMP) lint
	@command -v chromium >/dev/null 2>&1 || test -n "$$DEEPSPM_CHROMIUM" || \
		echo "make test: no chromium found: the browser tests (tests/test_serve_browser.py) will be SKIPPED"
	$(BIN)/python -m pytest -q -p no:cacheprovider -rs --durations=25

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks

# the fault soak (issue 17): 10 000 frames under injected faults and 20 kill -9 resumes; options: SOAK_ARGS="--frames 3000"
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
