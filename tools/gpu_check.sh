#!/usr/bin/env bash
# One-call GPU check on a CUDA machine: kernel harness, GPU tests, end-to-end benches.
# Usage: OUT=dir bash tools/gpu_check.sh [step ...]   steps: the names in the case below; default: kernels pytest
# llama sparse smol (the before/after set). kernels and pytest include every kernel family's rows and tests.
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
  prefix)  # 32 requests sharing a 32k-token document: SmolLM2 with its position limit raised to 40k (speed
           # and cache-vs-cold equality only: the model was not trained past 8k)
           d=/tmp/smol_40k; [ -f $d/config.json ] || python3 -m lserve_lite.cli convert ${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf} $d
           python3 -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); c['max_position_embeddings']=40960; json.dump(c,open(p,'w'))" $d/config.json
           step prefix 240 python3 tools/bench_prefix_cache.py doc --model $d --backend cuda --requests 32 --doc-tokens 32768 --out "$OUT/prefix_doc_cuda.json"
           step prefix_sparse 240 python3 tools/bench_prefix_cache.py doc --model $d --backend cuda --requests 32 --doc-tokens 32768 --sparse --pattern lserve_lite/sparse/patterns/SmolLM2-135M-Instruct/full_attention_heads.tsv --out "$OUT/prefix_doc_cuda_sparse.json" ;;
  quant)   step quant-bench 300 python3 tools/bench_quant_gpu.py --prefill-rows 2048 --out "$OUT/bench_quant_gpu.json"
           for q in int8 int4; do
             step llama-$q 200 python3 tools/bench_e2e.py --skip smollm2 --skip splits --quantize $q --llama-contexts 4096 32768 --out "$OUT/llama_$q.json"
           done ;;
  tp)      # tensor parallelism: world 1 through NCCL on any GPU count; world 2 and the figures with 2+ GPUs
           step tp 400 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_tp.py
           step tp_bench 300 python3 tools/bench_tp.py --tensor-parallel 1 $( [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && echo 2 ) --out "$OUT/bench_tp.json" ;;
  selector) step selector_tests 300 env LSERVE_SELECTOR=numba python3 -m pytest -p no:cacheprovider -m gpu -q \
               tests/test_gpu_sparse.py tests/test_gpu_graphs_sparse.py
            step selector_bench 200 python3 tools/bench_sparse.py --selector-only --out "$OUT" ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
