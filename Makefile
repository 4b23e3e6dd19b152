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

.PHONY: setup browser test demo bench clean

setup: $(STAMP) browser

# Chromium + chromedriver for the browser test of `retrieve.py serve` (Debian/Ubuntu, as root or with sudo); skipped
# quietly where apt-get is unavailable or not permitted: that test then skips, naming what to install.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	    >/dev/null 2>&1 || echo "note: could not install chromium (the browser test will skip)"; \
	else echo "note: no chromium; the browser test skips (apt-get install chromium chromium-driver)"; fi

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: $(STAMP) browser
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
	$(PY) benchmarks/bench_towers.py
	$(PY) benchmarks/bench_train_cached.py
	$(PY) benchmarks/bench_retrieval_index.py
	$(PY) benchmarks/bench_stream.py
	$(PY) benchmarks/bench_embed.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
