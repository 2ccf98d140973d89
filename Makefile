# Two commands on a fresh machine: `make demo` (set up + run on the embedded model, no network)
# and `make test` (set up with the test extra + run the tests). Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= The open() function returns

.PHONY: demo test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/mlx-flash generate --prompt "$(PROMPT)" --max-tokens 48

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	@echo "bench: no benchmarks yet (see issue: mlx-flash probe / bench)"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check mlx_flash tests tools

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
