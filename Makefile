# imgcls: `make run` runs the pipeline, `make test` the tests; both set up .venv first.
#
# On a machine where `nvidia-smi` lists a GPU, setup installs the GPU stack
# (requirements-gpu.txt: JAX with CUDA) and the Keras stages train on every GPU
# with KERAS_BACKEND=jax; elsewhere the CPU stack (requirements.txt, TensorFlow).
# DEVICE=cpu or DEVICE=gpu forces one; `make env` prints the plan.
#
# Offline, point KERAS_CACHE at a pre-seeded Keras cache (a folder with datasets/
# and models/): its files are linked into a writable .keras-home/, which becomes
# KERAS_HOME, so the ordinary download code finds them already cached.
#   make run KERAS_CACHE=/path/to/keras-cache

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
KERAS_CACHE ?=
DEVICE ?= auto

# The plan (scripts/imgcls/device.py) needs only the standard library, so it runs before any install.
export IMGCLS_DEVICE := $(DEVICE)
PLAN := PYTHONPATH=$(CURDIR)/scripts $(PYTHON) -m imgcls.device
STACK := $(shell IMGCLS_DEVICE=$(DEVICE) $(PLAN) --device)

# Stage commands in dvc.yaml say `python`: make it the project's interpreter.
export PATH := $(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2
ifneq ($(KERAS_CACHE),)
export KERAS_HOME := $(CURDIR)/.keras-home
endif

.PHONY: setup env run test bench bench-gpu serve image-serve image-train keras-home clean

setup: $(VENV)/.installed-$(or $(STACK),unknown)

$(VENV)/.installed-unknown:
	@$(PLAN); exit 2

# One stamp per stack: a venv set up for the CPU gets the GPU stack added when DEVICE=gpu asks for it.
$(VENV)/.installed-%: requirements.txt requirements-gpu.txt requirements-serve.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r $$($(PLAN) --requirements)
	touch $@

env:
	@$(PLAN)

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

# On a GPU machine: the backend and input-pipeline rows (JAX on every GPU), after setup installed the GPU stack.
bench-gpu: setup keras-home
	python tests/benchmark.py --only device

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

# Container images, built with podman (or docker): README, Containers.
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
