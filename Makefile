# ilf-deploy developer tasks. `make setup` installs a CPU-only PyTorch; GPU users see README.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
DEMO   ?= out/demo

.PHONY: setup test lint demo bench clean

setup: $(BIN)/ilf-deploy

$(BIN)/ilf-deploy: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[onnx,dev]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check ilf_deploy tests
	$(BIN)/ruff format --check ilf_deploy tests

# The main job: a model, its step plans, and images from the baseline and ILF plans.
demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/ilf-deploy make-tiny pixart-alpha $(DEMO)/model
	$(BIN)/ilf-deploy plan --model $(DEMO)/model --steps 10 --feedback first2,last2
	$(BIN)/ilf-deploy generate $(DEMO)/model --plan base-20 --prompt "a small red circle on a blue background" --out $(DEMO)/base-20.png
	$(BIN)/ilf-deploy generate $(DEMO)/model --plan ilf-10 --prompt "a small red circle on a blue background" --out $(DEMO)/ilf-10.png

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf out .pytest_cache .ruff_cache .mypy_cache
