# ilf-deploy developer tasks. `make setup` installs a CPU-only PyTorch; GPU users see README.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
DEMO   ?= out/demo

.PHONY: setup setup-browser test lint lint-cpp typecheck-trt demo default-model bench gpu-check clean cpp setup-cpp valijson dist images docs setup-images

setup: $(BIN)/ilf-deploy $(VENV)/triton/ilf-triton.json setup-cpp setup-browser

$(BIN)/ilf-deploy: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[export,onnx,serve,openvino,triton,ray,dev]"
	touch $@

# tritonserver and its Python backend, unpacked from the nvidia-pytriton wheel into $(VENV)/triton
# (the wheel is not installed: it pins numpy<2); docs/triton.md ("Triton Inference Server").
$(VENV)/triton/ilf-triton.json: $(BIN)/ilf-deploy
	$(BIN)/ilf-deploy install-triton
	touch $@

# The C++ runtime (cpp/, docs/cpp.md): libilf and ilf-run, built against the C++ SDK
# inside the openvino wheel and installed into $(VENV) (bin/ilf-run, lib/libilf.so, include/ilf,
# lib/cmake/ilf for find_package(ilf)). Ninja from PyPI; a rebuild compiles only what changed.
CPP_BUILD ?= cpp/build
cpp:
	@test -x $(BIN)/python || { echo "make cpp needs $(VENV) with openvino: run make setup first"; exit 2; }
	$(BIN)/python -m pip install --quiet "nlohmann-json>=3.11,<4" "ninja>=1.11"
	gen=""; if [ -x $(BIN)/ninja ]; then gen="-G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(BIN))/ninja"; fi; \
	cmake -S cpp -B $(CPP_BUILD) $$gen -DCMAKE_BUILD_TYPE=Release -DILF_PYTHON=$(abspath $(BIN))/python \
	  -DCMAKE_INSTALL_PREFIX=$(abspath $(VENV)) -DCMAKE_INSTALL_MESSAGE=NEVER \
	  $(if $(wildcard $(VALIJSON_LOCAL)/valijson/validator.hpp),-DILF_VALIJSON_INCLUDE_DIR=$(abspath $(VALIJSON_LOCAL))) > /dev/null
	cmake --build $(CPP_BUILD)
	cmake --install $(CPP_BUILD)

# `make setup` builds it where a C++ compiler and cmake exist, and says in one line when it skips.
# libilf's SHA-256 and PNG deflate come from OpenSSL and zlib: Debian's -dev packages, installed here
# where we are root (CI) and they are missing. Its JSON Schema checks use valijson (header-only): its
# headers are used from /usr/include, or unpacked from Debian's libvalijson-dev into $(VALIJSON_LOCAL)
# (`apt-get download`, no root; installing the package would pull Qt, POCO and five JSON libraries).
CPP_DEV_PACKAGES = libssl-dev zlib1g-dev
CPP_DEV_HEADERS = /usr/include/openssl/evp.h /usr/include/zlib.h
VALIJSON_LOCAL = .cache/valijson/usr/include
setup-cpp: $(BIN)/ilf-deploy
	@if command -v cmake > /dev/null 2>&1 && command -v c++ > /dev/null 2>&1; then \
	  if ! ls $(CPP_DEV_HEADERS) > /dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null 2>&1; then \
	    apt-get install -y -qq $(CPP_DEV_PACKAGES) > /dev/null 2>&1 || \
	    { apt-get update -qq > /dev/null 2>&1 && apt-get install -y -qq $(CPP_DEV_PACKAGES) > /dev/null 2>&1; }; fi; \
	  $(MAKE) --no-print-directory valijson; \
	  if ls $(CPP_DEV_HEADERS) > /dev/null 2>&1 && { [ -f /usr/include/valijson/validator.hpp ] || [ -f $(VALIJSON_LOCAL)/valijson/validator.hpp ]; }; \
	  then $(MAKE) --no-print-directory cpp; \
	  else echo "make setup: skipping the C++ runtime (make cpp): it needs $(CPP_DEV_PACKAGES) libvalijson-dev (apt-get install them)"; fi; \
	else echo "make setup: skipping the C++ runtime (make cpp): no C++ compiler or cmake here"; fi

# valijson's headers from Debian's package, unpacked without its dependencies (where they are not in
# /usr/include): `apt-get download` needs no root; one line where the package cannot be had.
valijson:
	@if [ ! -f /usr/include/valijson/validator.hpp ] && [ ! -f $(VALIJSON_LOCAL)/valijson/validator.hpp ]; then \
	  mkdir -p .cache/valijson && cd .cache/valijson && \
	  { apt-get download libvalijson-dev > /dev/null 2>&1 || \
	    { [ "$$(id -u)" = 0 ] && apt-get update -qq > /dev/null 2>&1 && apt-get download libvalijson-dev > /dev/null 2>&1; }; } && \
	  dpkg-deb -x libvalijson-dev_*.deb . && rm -f libvalijson-dev_*.deb || \
	  echo "make setup: could not fetch valijson's headers (apt-get download libvalijson-dev)"; fi

# The wheel and sdist (README "Install") into dist/, their metadata checked by twine.
dist: setup
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .
	$(BIN)/twine check --strict dist/*

# Debian's chromium and chromium-driver for the playground's browser test (tests/test_playground.py),
# installed with apt-get where this runs as root; elsewhere one line says that test will skip.
setup-browser:
	@if command -v chromium > /dev/null 2>&1 && command -v chromedriver > /dev/null 2>&1; then :; \
	elif command -v apt-get > /dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver > /dev/null; } \
	  || echo "make setup: could not install chromium: tests/test_playground.py will skip"; \
	else echo "make setup: skipping chromium (tests/test_playground.py will skip): no apt-get as root"; fi

# The container tools for `make images` and tests/test_images.py (Debian packages), installed with apt-get
# where this runs as root; elsewhere, or when they cannot be installed, one line says the image tests skip.
IMAGE_TOOLS := mmdebstrap buildah podman skopeo umoci runc
setup-images:
	@if command -v mmdebstrap > /dev/null 2>&1 && command -v buildah > /dev/null 2>&1 && command -v podman > /dev/null 2>&1 \
	  && command -v skopeo > /dev/null 2>&1; then :; \
	elif command -v apt-get > /dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(IMAGE_TOOLS) > /dev/null; } \
	  || echo "make setup-images: could not install $(IMAGE_TOOLS): make images and tests/test_images.py will skip"; \
	else echo "make setup-images: no apt-get as root: podman/buildah not installable, tests/test_images.py will skip"; fi

# Container images from Debian packages and PyPI (containers/build.py; docs/deploy.md ("Images")): oci-archives in
# out/images with their digests in out/images/images.json. serve and triton (~2.5 min each on 2 cores; ray
# ~4 min: IMAGES="serve triton ray"); BUNDLE=DIR bakes a bundle in (serve, triton).
IMAGES ?= serve triton
images: dist
	@if ! command -v buildah > /dev/null 2>&1 || ! command -v mmdebstrap > /dev/null 2>&1; then \
	  echo "make images: skipped: no buildah/mmdebstrap here (make setup-images installs them as root)"; exit 0; fi; \
	for image in $(IMAGES); do \
	  CONTAINERS_CONF=$(abspath containers/containers.conf) $(BIN)/python containers/build.py $$image \
	    $(if $(BUNDLE),--bundle $(BUNDLE)) || exit 1; \
	done

# One pytest-xdist worker per core: most tests are one Python process waiting on another (a CLI, a
# server), and one at a time they left a core idle. Each worker builds the session fixtures it needs.
test: setup
	$(BIN)/python -m pytest -q -n auto

# The docs site into docs/_build/html (docs/conf.py says why Sphinx); warnings are errors.
docs: setup
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

lint: setup
	$(BIN)/ruff check ilf_deploy tests experiments benchmarks scripts
	$(BIN)/ruff format --check ilf_deploy tests experiments benchmarks scripts
	# the layer contracts in pyproject.toml: no upward import, no import circle
	$(BIN)/lint-imports
	$(MAKE) --no-print-directory lint-cpp

# cppcheck on cpp/ (Debian's; apt-get-installed here where we are root and it is missing, as setup-cpp
# does for OpenSSL and zlib): any warning fails the build. False positives are suppressed inline, with why.
CPPCHECK = cppcheck -q --enable=warning,performance,portability --std=c++17 --inline-suppr --error-exitcode=1 \
  -I cpp/include -I cpp/src -I $(CPP_BUILD)/generated -I $(CPP_BUILD)/generated/include --suppress=missingIncludeSystem
lint-cpp:
	@if ! command -v cppcheck > /dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null 2>&1; then \
	  apt-get install -y -qq cppcheck > /dev/null 2>&1 || \
	  { apt-get update -qq > /dev/null 2>&1 && apt-get install -y -qq cppcheck > /dev/null 2>&1; } || \
	  echo "make lint: could not install cppcheck (apt busy or offline)"; fi
	@if command -v cppcheck > /dev/null 2>&1; then $(CPPCHECK) cpp/src cpp/tools cpp/tests cpp/examples; \
	else echo "make lint: skipping cppcheck on cpp/: not installed here (apt-get install cppcheck)"; fi

PROMPT ?= a small red circle on a blue background

# The main job, on the embedded default model (ilf_deploy/default_model, named `default`):
# plan -> bundle (ONNX) -> verified against PyTorch -> an image per plan -> eval table + grid.
demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/ilf-deploy plan --model default --steps 10 --feedback first2,last2
	$(BIN)/ilf-deploy build default --out $(DEMO)/bundle --plans base-20,ilf-10,cache-20
	$(BIN)/ilf-deploy verify $(DEMO)/bundle
	for plan in base-20 ilf-10 cache-20; do \
	  $(BIN)/ilf-deploy generate $(DEMO)/bundle --plan $$plan --prompt "$(PROMPT)" --out $(DEMO)/$$plan.png || exit 1; \
	done
	$(BIN)/ilf-deploy eval $(DEMO)/bundle --plans base-20,ilf-10,cache-20 --n 16 --grid $(DEMO)/grid.png --json-out $(DEMO)/eval.json

# Retrain the embedded default model from scratch (about 2 hours on 2 CPU cores; README:
# "Embedded default model"). Each stage resumes from its checkpoint in $(TRAIN_WORK).
TRAIN_WORK ?= out/train-base
DEFAULT_MODEL := ilf_deploy/default_model
# Loop 3-5 of 8 (the paper's 8-19 of 28 less one block, so ILF-10 costs what base-12 does); uniform
# t_post (rescale's n/m = 8/3 jump on the first steps hurt this model: README).
FEEDBACK_RECIPE := --loop 3:5 --steps 800 --batch-size 32 --lr 1e-3 --t-post uniform
default-model: setup
	$(BIN)/ilf-deploy train-base all --work $(TRAIN_WORK) --out $(DEFAULT_MODEL) --force
	$(BIN)/ilf-deploy train-feedback $(DEFAULT_MODEL) $(FEEDBACK_RECIPE) --force
	rm -f $(DEFAULT_MODEL)/feedback/fad_checkpoint.pt

bench: setup
	$(BIN)/python -m benchmarks.run

# mypy over the TensorRT backend against tensorrt-stubs (no TensorRT needed: the stubs are installed
# without their dependency, TensorRT itself; tests/support/trt_stubs.py repairs them for mypy).
typecheck-trt: setup
	$(BIN)/python -m pip install --quiet --no-deps "tensorrt-stubs==10.13.0.35.1" "polygraphy>=0.49"
	$(BIN)/python -m tests.support.trt_stubs .mypy-stubs
	MYPYPATH=.mypy-stubs $(BIN)/mypy --config-file .mypy-stubs/mypy.ini ilf_deploy/engines/backends/tensorrt.py

# On an NVIDIA GPU with TensorRT 10/11 (docs/tensorrt.md: "TensorRT on H100"). Never run in CI. The default
# model is PixArt-XL-2 with random weights (benchmarks/backbone.py); GPU_MODEL=... for a real one.
GPU_OUT   ?= out/gpu
GPU_MODEL ?= $(GPU_OUT)/model
gpu-check: setup
	$(BIN)/python -c "import torch, tensorrt; assert torch.cuda.is_available(), 'no CUDA GPU'; print('TensorRT', tensorrt.__version__, 'on', torch.cuda.get_device_name())"
	$(BIN)/python -m pytest -q -rs -m gpu tests/test_tensorrt_gpu.py
	test -f $(GPU_MODEL)/model_index.json || $(BIN)/python -c "from pathlib import Path; from benchmarks.backbone import Size, build_model_dir; build_model_dir(Path('$(GPU_MODEL)'), Size())"
	rm -rf $(GPU_OUT)/bundle
	$(BIN)/ilf-deploy build $(GPU_MODEL) --out $(GPU_OUT)/bundle --plans base-20,ilf-10 --no-copy-model
	printf 'a small red circle on a blue background\na photograph of a cat on a wooden table\na city street at night, neon lights\n' > $(GPU_OUT)/prompts.txt
	$(BIN)/ilf-deploy calibrate $(GPU_OUT)/bundle --prompts $(GPU_OUT)/prompts.txt --max-samples 8
	$(BIN)/ilf-deploy quantize $(GPU_OUT)/bundle --mode int8-qdq
	$(BIN)/ilf-deploy quantize $(GPU_OUT)/bundle --mode fp8-qdq
	for v in "" "--variant int8_qdq" "--variant fp8_qdq"; do \
	  $(BIN)/ilf-deploy build-engines $(GPU_OUT)/bundle $$v && \
	  $(BIN)/ilf-deploy verify-engines $(GPU_OUT)/bundle $$v && \
	  $(BIN)/ilf-deploy bench $(GPU_OUT)/bundle --backend tensorrt $$v --runs 5 || exit 1; \
	done

clean:
	rm -rf out .pytest_cache .ruff_cache .mypy_cache
