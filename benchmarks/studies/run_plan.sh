#!/usr/bin/env bash
# Run the flickr8k_pretrained.py runs listed in a plan file (one line of `run` flags each; `#` comments), N at a
# time with one thread each, skipping the runs whose record already exists. Usage: [TOP='--vision DIR --output_dir DIR']
# run_plan.sh PLAN [N] (TOP: the script's own flags, before `run`)
set -u
cd "$(dirname "$0")/../.."
plan=$1; jobs=${2:-2}
PY=${PY:-.venv/bin/python}
grep -v '^\s*#' "$plan" | grep -v '^\s*$' | xargs -P "$jobs" -I{} sh -c "OMP_NUM_THREADS=1 $PY benchmarks/studies/flickr8k_pretrained.py --threads 1 ${TOP:-} run {} 2>&1 | grep -E '^[a-z_]+.*seed [0-9]+: rsum|Error|error' || true"
