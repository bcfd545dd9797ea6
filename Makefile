# The whole set-up is in here: `make serve` and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
MODEL_DIR := .models/demo-vlm
CLIP_DIR := .models/demo-clip
export UV_PYTHON := 3.11

.PHONY: setup demo-model serve test lint fmt clean

setup: $(VENV)/.iris-synced

$(VENV)/.iris-synced: pyproject.toml uv.lock tests/node/package-lock.json
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || \
		{ echo ">> installing uv"; python3 -m pip install --quiet uv; }
	@echo ">> installing the locked environment into $(VENV) (first run downloads ~3.5 GB)"
	$(UV) sync --frozen --extra cpu --compile-bytecode
	@echo ">> installing the Node contract-test client (tests/node)"
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
	@touch $@

demo-model: setup $(MODEL_DIR)/.complete $(CLIP_DIR)/.complete

$(MODEL_DIR)/.complete: scripts/make_demo_model.py scripts/templates/qwen2_5_vl_chat.jinja
	@echo ">> generating the tiny random-weight demo VLM into $(MODEL_DIR)"
	$(PY) scripts/make_demo_model.py --out $(MODEL_DIR) --force
	@touch $@

$(CLIP_DIR)/.complete: scripts/make_demo_clip.py
	@echo ">> generating the tiny random-weight demo CLIP encoder into $(CLIP_DIR)"
	$(PY) scripts/make_demo_clip.py --out $(CLIP_DIR) --force

serve: setup demo-model
	$(PY) -m deployments.run

test: setup demo-model lint
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(PY) -m mypy

fmt: setup
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
