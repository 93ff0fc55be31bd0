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
	$(BIN)/python -m pip install --quiet -e ".[onnx,serve,dev]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check ilf_deploy tests
	$(BIN)/ruff format --check ilf_deploy tests

PROMPT ?= a small red circle on a blue background

# The main job: a model -> a bundle (ONNX) -> verified against PyTorch -> images from each plan.
demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/ilf-deploy make-tiny pixart-alpha $(DEMO)/model
	$(BIN)/ilf-deploy plan --model $(DEMO)/model --steps 10 --feedback first2,last2
	$(BIN)/ilf-deploy build $(DEMO)/model --out $(DEMO)/bundle --plans base-20,ilf-10,cache-20
	$(BIN)/ilf-deploy verify $(DEMO)/bundle
	for plan in base-20 ilf-10 cache-20; do \
	  $(BIN)/ilf-deploy generate $(DEMO)/bundle --plan $$plan --prompt "$(PROMPT)" --out $(DEMO)/$$plan.png || exit 1; \
	done

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf out .pytest_cache .ruff_cache .mypy_cache
