PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA := data
# The latest stack: Python 3.12 (megatron-core 0.17+ requires it), from pyenv or on PATH.
PYTHON_LATEST ?= $(or $(lastword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12)),$(shell command -v python3.12 2>/dev/null))
VENV_LATEST := .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
STAMP_LATEST := $(VENV_LATEST)/.installed

.PHONY: install install-latest test test-all test-latest demo demo-megatron-lm data check-parallel clean gpu-wheels tensorboard

# Default stack: Python 3.11, PyTorch's CPU wheel, megatron-core 0.16.1. The Dockerfile installs
# requirements.txt and the latest megatron-core into NGC's PyTorch instead (keeping that PyTorch).
# DeepSpeed (for megatron_patch.deepspeed) is an sdist built against the venv's torch, hence
# --no-build-isolation; --no-deps keeps pip off its unpinned torch requirement.
REQUIREMENTS := requirements.txt requirements-test.txt requirements-deepspeed.txt requirements-hf.txt
$(STAMP): pyproject.toml $(REQUIREMENTS) requirements-torch.txt requirements-megatron.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-torch.txt
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-megatron.txt -r requirements-test.txt -r requirements-hf.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -r requirements-deepspeed.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Latest stack: Python 3.12, PyTorch's CUDA build from PyPI (runs on the CPU; ~5 GB),
# megatron-core 0.19.2.
$(STAMP_LATEST): pyproject.toml $(REQUIREMENTS) requirements-torch-latest.txt requirements-megatron-latest.txt
	@$(PYTHON_LATEST) -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null || { echo "error: Python 3.12 not found ($(PYTHON_LATEST)): install it (pyenv install 3.12) or pass PYTHON_LATEST=/path/to/python3.12" >&2; exit 2; }
	test -x $(PY_LATEST) || $(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install --quiet -r requirements-torch-latest.txt
	$(PY_LATEST) -m pip install --quiet -r requirements.txt -r requirements-megatron-latest.txt -r requirements-test.txt -r requirements-hf.txt
	$(PY_LATEST) -m pip install --quiet --no-deps --no-build-isolation -r requirements-deepspeed.txt
	$(PY_LATEST) -m pip install --quiet --no-deps -e .
	touch $(STAMP_LATEST)

install: $(STAMP)

install-latest: $(STAMP_LATEST)

# Tests run in TEST_WORKERS pytest processes (pytest-xdist); most of them start their own
# processes, whose imports and rendezvous leave cores idle.
# `make test` leaves out the tests marked slow (long end-to-end runs, extra layout cases; under
# 10 minutes on 2 cores); `make test-all` and `make test-latest` run every test (CI runs both).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

# The whole suite on the latest stack.
test-latest: $(STAMP_LATEST)
	$(PY_LATEST) -m pytest -q -n $(TEST_WORKERS) tests

check-parallel: $(STAMP)
	$(PY) tools/check_parallel_consistency.py

clean:
	rm -rf $(VENV) $(VENV_LATEST) build *.egg-info

# Wheels for benchmarks/run_on_gpu.sh on a GPU machine without network access whose PyTorch
# (with CUDA and triton) is preinstalled: WHEELS=.gpu_wheels benchmarks/run_on_gpu.sh there.
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		-d .gpu_wheels -r requirements-megatron-latest.txt sentencepiece==0.2.3 pyyaml==6.0.4

# Built-in default corpus (real text, six domains; see LICENSES/CORPUS.md), tokenizer, datasets.
$(DATA)/corpus.jsonl: | $(STAMP)
	$(PY) tools/build_corpus.py --output $@

$(DATA)/tokenizer.model: $(DATA)/corpus.jsonl
	$(PY) tools/train_tokenizer.py --input $< --model-prefix $(DATA)/tokenizer --vocab-size 8192 --model-type bpe

$(DATA)/corpus_train.bin: $(DATA)/corpus.jsonl $(DATA)/tokenizer.model
	$(PY) tools/preprocess_data.py --input $< --output-prefix $(DATA)/corpus_train --tokenizer-model $(DATA)/tokenizer.model --only-split train --split-by-domain

$(DATA)/corpus_valid.bin: $(DATA)/corpus.jsonl $(DATA)/tokenizer.model
	$(PY) tools/preprocess_data.py --input $< --output-prefix $(DATA)/corpus_valid --tokenizer-model $(DATA)/tokenizer.model --only-split valid

data: $(DATA)/corpus_train.bin $(DATA)/corpus_valid.bin

# Pretrain the tiny GPT-MoE (8 experts, top-2, L_o + L_v) on 2 CPU processes with EP=2.
demo: $(STAMP) data
	OUTPUT_DIR=runs/demo examples/pretrain/run_pretrain_moe.sh tiny_cpu

# The losses in Megatron-LM's own pretrain() (latest stack): a tiny GPT-MoE on mock data, EP=2.
MEGATRON_LM_DEMO = --num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 \
	--seq-length 64 --max-position-embeddings 64 --micro-batch-size 4 --global-batch-size 8 \
	--lr 1e-3 --lr-warmup-iters 5 --train-iters 50 --num-experts 4 --moe-router-topk 2 \
	--moe-token-dispatcher-type alltoall --moe-aux-loss-coeff 1e-2 --expert-model-parallel-size 2 \
	--mock-data --tokenizer-type NullTokenizer --vocab-size 256 --disable-bias-linear \
	--normalization RMSNorm --position-embedding-type rope --log-interval 10 --eval-interval 50 \
	--eval-iters 2 --save-interval 50 --moe-ortho-loss-coeff auto --moe-var-loss-coeff auto

demo-megatron-lm: $(STAMP_LATEST)
	GPUS_PER_NODE=2 OUTPUT_DIR=runs/demo_megatron_lm PYTHON=$(PY_LATEST) \
		examples/pretrain/run_pretrain_megatron_lm.sh $(MEGATRON_LM_DEMO)

# TensorBoard over every run's logs (runs/*/tensorboard), from the venv.
tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs
