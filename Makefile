# d2v_engine: every target is idempotent (stamp files in .stamps/ record finished set-up steps).
#   make pretrain   set up, prepare the default data set, pretrain configs/default_v2.yaml (data2vec 2.0)
#   make test       set up, run the test suite
#   make data       prepare the three offline data sets (Fashion-MNIST, spoken words, text corpus)
#   make gpu-check OUT=dir   GPU checks and timings (benchmarks/gpu_check.py); smoke mode without a GPU
#   make gpu-wheels the wheels a lent GPU machine lacks, into wheels/ (carried there with the tree)
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMPS := .stamps
DATA ?= data
CONFIG ?= configs/default_v2.yaml
NUM_GPUS ?= 1
ARGS ?=
OUT ?= gpu-check

# Debian packages the offline data sets come from (see the README's data section).
APT_PKGS := dataset-fashion-mnist espeak-ng sox libsox-fmt-all wordnet-base bible-kjv fortunes
PY_DEPS := numpy triton pybind11 webdataset soundfile pillow tokenizers pyyaml tqdm tensorboard \
           matplotlib scikit-learn safetensors pytest
# The `hf` extra, installed so that the Hugging Face interop tests run (tests/test_hf.py).
HF_DEPS := transformers==5.24.0
DEEPSPEED := deepspeed==0.19.8
# What a lent GPU machine (python 3.12, torch, triton, no network) lacks, besides DeepSpeed itself.
GPU_PYTHON ?= 3.12
GPU_WHEELS := hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
              typing-inspection==0.4.5 typing-extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7 \
              soundfile==0.14.0 cffi==2.1.1 pycparser==3.12

# On a CUDA machine keep the torch that is installed there (the venv sees the system packages);
# elsewhere pin the CPU build, in every pip command, so that nothing pulls a multi-GB CUDA build.
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
VENV_FLAGS := --system-site-packages
TORCH := $(shell python3 -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null)
else
VENV_FLAGS :=
TORCH := torch==2.13.0
endif
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data pretrain test clean gpu-check gpu-wheels
setup: $(STAMPS)/python

$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
	  echo "installing Debian packages: $(APT_PKGS)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PKGS); \
	fi
	@touch $@

$(STAMPS)/python: setup.py Makefile $(STAMPS)/apt
	@mkdir -p $(STAMPS)
	@[ -x $(PY) ] || python3 -m venv $(VENV_FLAGS) .venv
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH) $(PY_DEPS) $(HF_DEPS)
	# DeepSpeed builds from source against the torch above (no isolated build environment).
	$(PIP) install -q --no-build-isolation $(TORCH) $(DEEPSPEED)
	$(PIP) install -q $(TORCH) nvidia-dali-cuda120
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

data: setup
	$(PY) -m d2v_engine.cli prepare fashion-mnist --out $(DATA)
	$(PY) -m d2v_engine.cli prepare spoken-words --out $(DATA)
	$(PY) -m d2v_engine.cli prepare text-corpus --out $(DATA)

pretrain: setup
	$(PY) -m d2v_engine.cli prepare fashion-mnist --out $(DATA)
	.venv/bin/deepspeed --num_gpus $(NUM_GPUS) d2v_engine/pretrain.py --config $(CONFIG) $(ARGS)
	@# Proof of learning: probe the run's frozen encoder beside the same encoder at random init
	@# (k-NN and linear probe on every task of its modality); the run dir gets eval.json and plots/eval.png.
	$(PY) -m d2v_engine.cli eval --config $(CONFIG) $(ARGS)

test: setup
	$(PY) -m pytest -q tests

# On a GPU machine: the system python3, never a venv (gpu_check.py installs wheels/ into it);
# elsewhere the smoke mode on the project's venv.
ifeq ($(HAS_CUDA),1)
gpu-check:
	bash benchmarks/gpu_check.sh $(OUT) $(ARGS)
else
gpu-check: setup
	PYTHON=$(PY) bash benchmarks/gpu_check.sh $(OUT) $(ARGS)
endif

# DeepSpeed is pure Python: its sdist becomes a wheel without its CUDA ops (they would JIT-build).
gpu-wheels: setup
	rm -rf wheels && mkdir -p wheels
	$(PIP) download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d wheels $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(PIP) wheel -q --no-deps --no-build-isolation -w wheels $(DEEPSPEED)
	@du -sh wheels

clean:
	rm -rf $(STAMPS) build *.egg-info
