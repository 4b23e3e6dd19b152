# BCLS developer commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
DEMO_DIR ?= outputs/demo

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) examples/train.py --output_dir $(DEMO_DIR)
	$(PY) examples/evaluate.py --model $(DEMO_DIR) --split test --output_dir $(DEMO_DIR)/eval

bench: $(STAMP)
	$(PY) benchmarks/bench_loss.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_locked_cache.py
	$(PY) benchmarks/bench_retrieval_index.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
