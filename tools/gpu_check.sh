#!/usr/bin/env bash
# One-call GPU check on a CUDA machine: kernel harness, GPU tests, end-to-end benches.
# Usage: OUT=dir bash tools/gpu_check.sh [kernels] [pytest] [llama] [sparse] [smol] [selector]   (default: all)
# Each step has its own time limit so one slow or failing step does not hide the others.
set -u
OUT=${OUT:-results}; mkdir -p "$OUT"
steps=${*:-kernels pytest llama sparse smol selector}
step() { local name=$1 limit=$2; shift 2; echo "== $name ($(date +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$? $(tail -n 1 "$OUT/$name.log")"; }
for s in $steps; do case $s in
  kernels) step kernels 200 python3 -m lserve_lite.cli kernels test --json "$OUT/kernels.json" ;;
  pytest)  step pytest 300 python3 -m pytest -p no:cacheprovider -m gpu -q --ignore=tests/test_gpu_e2e.py ;;
  llama)   step llama 200 python3 tools/bench_e2e.py --skip smollm2 --skip splits --llama-contexts 4096 32768 --out "$OUT/llama.json" ;;
  sparse)  step sparse 200 python3 tools/bench_e2e.py --sparse --sparse-contexts 32768 --deadline $(($(date +%s)+120)) --out "$OUT/sparse.json" ;;
  smol)    step smol 200 env LSERVE_SMOLLM2_GGUF=${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf} python3 tools/bench_e2e.py --skip llama --skip splits --out "$OUT/smol.json"
           step e2e 200 env LSERVE_SMOLLM2_GGUF=${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf} python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_e2e.py ;;
  selector) step selector_tests 300 env LSERVE_SELECTOR=numba python3 -m pytest -p no:cacheprovider -m gpu -q \
               tests/test_gpu_sparse.py tests/test_gpu_graphs_sparse.py
            step selector_bench 200 python3 tools/bench_sparse.py --selector-only --out "$OUT" ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
