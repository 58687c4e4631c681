# imgcls: `make run` runs the pipeline, `make test` the tests; both set up .venv first.
#
# Setup picks what this machine can run, and `make env` prints the plan and why:
#   Python (scripts/venv.sh): the first of python3.13, python3.12, python3.11 and python3 that is
#     3.11 or newer, or PYTHON=...; without one it says how to get one. A .venv left without pip
#     (python3.X-venv missing) or made by an older Python is made again.
#   Stack (scripts/imgcls/device.py), by the NVIDIA driver and GPUs that `nvidia-smi` reports:
#     driver 580.65.06+, compute capability 7.5+: gpu-cuda13, requirements-gpu-cuda13.txt -c constraints-cuda13.txt
#     driver 525.60.13+, compute capability 5.2+: gpu-cuda12, requirements-gpu-cuda12.txt -c constraints-cuda12.txt
#     older, or no working nvidia-smi: cpu, requirements.txt (TensorFlow)
#   The constraints pin every CUDA library, so two installs give the same stack.
#   On a GPU stack the Keras stages train on every GPU with KERAS_BACKEND=jax, and stop with a
#   message if JAX cannot use the GPU. DEVICE=cpu or DEVICE=gpu forces one.
#
# Offline, point KERAS_CACHE at a pre-seeded Keras cache (a folder with datasets/
# and models/): its files are linked into a writable .keras-home/, which becomes
# KERAS_HOME, so the ordinary download code finds them already cached.
#   make run KERAS_CACHE=/path/to/keras-cache

PYTHON ?=
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
KERAS_CACHE ?=
DEVICE ?= auto

# The plan (scripts/imgcls/device.py) needs only the standard library, so it runs before any install,
# with any python3.
export IMGCLS_DEVICE := $(DEVICE)
PLAN := PYTHONPATH=$(CURDIR)/scripts $(or $(PYTHON),python3) -m imgcls.device
STACK := $(shell IMGCLS_DEVICE=$(DEVICE) $(PLAN) --stack)

# Stage commands in dvc.yaml say `python`: make it the project's interpreter.
export PATH := $(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2
ifneq ($(KERAS_CACHE),)
export KERAS_HOME := $(CURDIR)/.keras-home
endif

.PHONY: setup env run test bench bench-transfer bench-trust bench-tune bench-gpu tune tune-apply serve image-serve image-train keras-home clean

setup: $(VENV)/.installed-$(or $(STACK),unknown)

$(VENV)/.installed-unknown:
	@$(PLAN); exit 2

# One stamp per stack (cpu, gpu-cuda12, gpu-cuda13): a venv set up for the CPU gets a GPU stack added
# when DEVICE=gpu asks for it.
$(VENV)/.installed-%: requirements.txt requirements-serve.txt requirements-gpu-cuda12.txt \
		requirements-gpu-cuda13.txt constraints-cuda12.txt constraints-cuda13.txt
	@PYTHON="$(PYTHON)" sh scripts/venv.sh $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $$($(PLAN) --pip-arguments)
	touch $@

env:
	@$(PLAN)
	@echo "python:        $$(PYTHON="$(PYTHON)" sh scripts/venv.sh --find 2>/dev/null || echo 'none of 3.11 or newer (make setup says how to get one)')"

keras-home:
ifneq ($(KERAS_CACHE),)
	@test -d "$(KERAS_CACHE)" || { echo "KERAS_CACHE=$(KERAS_CACHE) is not a folder"; exit 2; }
	@mkdir -p $(KERAS_HOME)/datasets $(KERAS_HOME)/models
	@for sub in datasets models; do \
	  for file in "$(KERAS_CACHE)"/$$sub/*; do \
	    [ -e "$$file" ] && ln -sf "$$(cd "$$(dirname "$$file")" && pwd)/$$(basename "$$file")" $(KERAS_HOME)/$$sub/; \
	  done; \
	done; true
endif

run: setup keras-home
	dvc repro

test: setup keras-home
	python -m pytest

bench: setup keras-home
	python tests/benchmark.py

# A hyperparameter search over the keys in params.yaml's tune section (README, Tuning): every trial is a
# DVC experiment (`dvc exp show`). WORKERS trials at a time; TUNE_STORAGE=postgresql://... shares the study
# between machines; run it again to go on with an interrupted study.
#   make tune [WORKERS=2] [TUNE_STORAGE=postgresql://user:password@host/database]
WORKERS ?= 1
tune: setup keras-home
	python scripts/tune.py --workers $(WORKERS)

# The best trial becomes the pipeline's model: dvc exp apply <its experiment>, then dvc repro.
tune-apply: setup keras-home
	python scripts/tune.py --apply

# train_transfer's defaults beside the previous ones and the linear probe, on gear, trashnet and trashnet at
# 30 photos a class, 3 splits each (about 70 minutes on 2 CPU cores; needs ../shared/data/datasets/trashnet-256.tar.gz).
bench-transfer: setup keras-home
	python tests/bench_transfer_splits.py $$(mktemp -d) --split-seeds 0,1,2

# The `unknown` threshold's test coverage against its target, and the label audit, on gear (with the CNN)
# and trashnet, 3 splits each (about 80 minutes on 2 CPU cores; needs ../shared/data/datasets/trashnet-256.tar.gz).
bench-trust: setup keras-home
	python tests/bench_trust.py $$(mktemp -d) --split-seeds 0,1,2

# An hour of `make tune` on trashnet, then train_transfer with the default and the tuned params on 3 splits
# (about 2 hours on 2 CPU cores; needs ../shared/data/datasets/trashnet-256.tar.gz).
bench-tune: setup keras-home
	python tests/bench_tune.py $$(mktemp -d) --timeout 3600 --split-seeds 0,1,2

# On a GPU machine: the gear pipeline through evaluate on the GPU (stage times, images/s, pipeline efficiency,
# a killed stage resumed), with the trained models saved in $(GPU_CHECK_OUT) for
# `python tests/gpu_check.py --export-check $(GPU_CHECK_OUT)` on a machine with TensorFlow.
GPU_CHECK_OUT ?= gpu-check
bench-gpu: setup keras-home
	python tests/gpu_check.py --out $(GPU_CHECK_OUT)

# The HTTP API and upload page on http://127.0.0.1:$(PORT)/ (model, host and upload limit from params.yaml).
PORT ?= 8000
serve: setup
	python scripts/serve.py --port $(PORT)

# Classify a folder of any size into a CSV, in bounded memory (README, Serving); RESUME=1 goes on
# from a stopped run. MODEL: cnn, transfer, best, or an exported file such as models/export/best.onnx.
#   make predict DIR=/data/new-photos [MODEL=...] [OUT=predictions.csv] [RESUME=1]
.PHONY: predict
OUT ?= predictions.csv
predict: setup
	@test -n "$(DIR)" || { echo "give the folder of photos: make predict DIR=path/to/photos [MODEL=...] [OUT=...]"; exit 2; }
	python scripts/predict_new.py --images "$(DIR)" --out "$(OUT)" $(if $(MODEL),--model "$(MODEL)") $(if $(RESUME),--resume)

# Container images, built with podman (or docker): docs/serving.md, Containers.
#   make image-serve && podman run -p 8000:8000 imgcls-serve
# IMAGE_ARGS passes more build options, e.g. IMAGE_ARGS="--build-arg BASE=my-python-3.11-image".
ENGINE ?= $(shell command -v podman || command -v docker)
# podman writes OCI images by default, which drop HEALTHCHECK; the docker format keeps it.
IMAGE_FORMAT := $(if $(findstring podman,$(ENGINE)),--format docker,)
IMAGE_ARGS ?=
image-serve:
	@test -n "$(ENGINE)" || { echo "no container engine: install podman (or docker)"; exit 2; }
	@test -d models/export || { echo "models/export/ not found: run \`make run\` (or \`dvc repro export\`) first"; exit 2; }
	$(ENGINE) build $(IMAGE_FORMAT) -f Containerfile.serve -t imgcls-serve $(IMAGE_ARGS) .

image-train:
	@test -n "$(ENGINE)" || { echo "no container engine: install podman (or docker)"; exit 2; }
	$(ENGINE) build $(IMAGE_FORMAT) -f Containerfile.train -t imgcls-train $(IMAGE_ARGS) .

clean:
	rm -rf $(VENV) .keras-home .cache
