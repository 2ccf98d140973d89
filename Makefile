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

DEMO_FLASH := models/opt-tiny-flash

# The embedded model is tiny (192 wide), so 4 KiB bundles instead of the 16 KiB Apple page.
$(DEMO_FLASH)/manifest.json: | $(VENV)/.installed
	$(BIN)/mlx-flash convert models/opt-tiny --out $(DEMO_FLASH) --align 4096 --force

# Flash mode under a 6.5 MB budget, below the model's own 6.9 MB: FFN neurons stream from disk.
demo: $(VENV)/.installed $(DEMO_FLASH)/manifest.json
	$(BIN)/mlx-flash generate --model $(DEMO_FLASH) --memory 6.5MB --max-context 256 \
		--prompt "$(PROMPT)" --max-tokens 48

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	@dir=$${BENCH_DIR:-models/bench}; mkdir -p $$dir && \
	plot=$$($(BIN)/python -c 'import matplotlib' 2>/dev/null && echo yes); \
	$(BIN)/mlx-flash probe --path $$dir $${plot:+--plot $$dir/probe.png} && \
	{ test -f $$dir/opt-6.7b-synthetic/manifest.json || $(BIN)/python tools/synthetic_flash.py \
		$$dir/opt-6.7b-synthetic --checkpoint $$dir/opt-6.7b-synthetic-hf; } && \
	$(BIN)/mlx-flash bench --model $$dir/opt-6.7b-synthetic --memory 50%model \
		--tokens $${BENCH_TOKENS:-8} --prompt "$${BENCH_PROMPT:-The open() function}" $${plot:+--plot $$dir/bench.png}

lint: $(VENV)/.installed-test
	$(BIN)/ruff check mlx_flash tests tools

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
