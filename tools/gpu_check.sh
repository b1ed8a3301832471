#!/usr/bin/env bash
# One-call GPU check on a CUDA machine: kernel harness, GPU tests, end-to-end benches.
# Usage: OUT=dir bash tools/gpu_check.sh [step ...]   steps: the names in the case below; default: kernels pytest
# llama sparse smol selector (the before/after set). kernels and pytest include every kernel family's rows and tests.
# Each step has its own time limit so one slow or failing step does not hide the others.
set -u
OUT=${OUT:-results}; mkdir -p "$OUT"
steps=${*:-kernels pytest llama sparse smol selector}
step() { local name=$1 limit=$2; shift 2; echo "== $name ($(date +%T))"; timeout -k 30 "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$? $(tail -n 1 "$OUT/$name.log")"; }
for s in $steps; do case $s in
  kernels) step kernels 200 python3 -m lserve_lite.cli kernels test --json "$OUT/kernels.json" ;;
  pytest)  # three steps (2026-12-05: the first two together needed over 420 s on a fresh machine, kernels compiled
           # on first use); each of pytest1, pytest2, pytest_sparse also runs alone, to fit one device call
           bash "$0" pytest1 pytest2 pytest_sparse ;;
  pytest1) step pytest1 300 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_attention.py \
               tests/test_gpu_bf16_prefill.py tests/test_gpu_kv_quant.py ;;
  pytest2) step pytest2 300 python3 -m pytest -p no:cacheprovider -m gpu -q --ignore=tests/test_gpu_e2e.py \
               --ignore=tests/test_gpu_sparse.py --ignore=tests/test_gpu_attention.py \
               --ignore=tests/test_gpu_bf16_prefill.py --ignore=tests/test_gpu_kv_quant.py ;;
  engine)  # the engine-level GPU tests of LServe mode (overlapped steps, graphs, prefix cache, the tensor-parallel
           # worker path on one GPU): the first to run after a change to the executor or the planner
           step engine 280 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_overlap.py \
               tests/test_gpu_graphs_sparse.py tests/test_gpu_prefix_cache.py tests/test_gpu_tp.py ;;
  files)   # every GPU test file in its own step and log (pytest_<file>.log), so that a call cut by its time limit still
           # says which files passed; FILES="a b" (names without tests/ and .py) picks some. On a warm machine whose
           # kernels are compiled most files take seconds (2026-12-06: the whole suite but test_gpu_e2e in ~6 min)
           for f in ${FILES:-$(cd tests && ls test_gpu_*.py | sed 's/\.py$//')}; do
             step pytest_$f 300 env LSERVE_SMOLLM2_GGUF=${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf} \
               python3 -m pytest -p no:cacheprovider -m gpu -q tests/$f.py
           done ;;
  pytest_sparse) # the sparse file alone takes minutes (long and tied selector lists on both selectors)
           step pytest_sparse 300 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_sparse.py ;;
  llama)   step llama 200 python3 tools/bench_e2e.py --skip smollm2 --skip smollm2-lserve --skip splits --llama-contexts 4096 32768 --out "$OUT/llama.json" ;;
  sparse)  step sparse 200 python3 tools/bench_e2e.py --sparse --sparse-contexts 32768 --deadline $(($(date +%s)+120)) --out "$OUT/sparse.json" ;;
  smol)    step smol 200 env LSERVE_SMOLLM2_GGUF=${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf} python3 tools/bench_e2e.py --skip llama --skip splits --out "$OUT/smol.json"
           step e2e 200 env LSERVE_SMOLLM2_GGUF=${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf} python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_e2e.py ;;
  prefix)  # 32 requests sharing a 32k-token document: SmolLM2 with its position limit raised to 40k (speed
           # and cache-vs-cold equality only: the model was not trained past 8k)
           d=/tmp/smol_40k; [ -f $d/config.json ] || python3 -m lserve_lite.cli convert ${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf} $d
           python3 -c "import json,sys; p=sys.argv[1]; c=json.load(open(p)); c['max_position_embeddings']=40960; json.dump(c,open(p,'w'))" $d/config.json
           step prefix 240 python3 tools/bench_prefix_cache.py doc --model $d --backend cuda --requests 32 --doc-tokens 32768 --out "$OUT/prefix_doc_cuda.json"
           step prefix_sparse 240 python3 tools/bench_prefix_cache.py doc --model $d --backend cuda --requests 32 --doc-tokens 32768 --sparse --pattern lserve_lite/sparse/patterns/SmolLM2-135M-Instruct/full_attention_heads.tsv --out "$OUT/prefix_doc_cuda_sparse.json" ;;
  rope)    # RoPE + the K/V write in the decode QKV GEMV's epilogue (on for batch-1 steps by default; LSERVE_CUDA_FUSE_ROPE=1:
           # up to 8 rows, 0: never): its tests, then SmolLM2 (its GGUF) and the Llama-3-8B shape at 4k with it at every
           # GEMV-sized step and never, alternating
           step rope_tests 240 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_qkv_rope.py
           for i in 1 2; do for f in 1 0; do
             step smol_rope${f}_$i 200 env LSERVE_CUDA_FUSE_ROPE=$f LSERVE_SMOLLM2_GGUF=${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf} \
                 python3 tools/bench_e2e.py --skip llama --skip splits --out "$OUT/smol_rope${f}_$i.json"
             step llama_rope${f}_$i 200 env LSERVE_CUDA_FUSE_ROPE=$f python3 tools/bench_e2e.py --skip smollm2 \
                 --skip splits --llama-contexts 4096 --out "$OUT/llama_rope${f}_$i.json"
           done; done ;;
  quant)   step quant-bench 300 python3 tools/bench_quant_gpu.py --prefill-rows 2048 --out "$OUT/bench_quant_gpu.json"
           for q in int8 int4; do
             step llama-$q 200 python3 tools/bench_e2e.py --skip smollm2 --skip splits --quantize $q --llama-contexts 4096 32768 --out "$OUT/llama_$q.json"
           done ;;
  kvq_v2)  # the register-level quantized decode (LSERVE_KVQ_DECODE=v2): its tests, then all decode formats vs SDPA
           step kvq_v2_tests 120 env LSERVE_KVQ_DECODE=v2 python3 -m pytest -p no:cacheprovider -m gpu -q \
               tests/test_gpu_kv_quant.py tests/test_kvq_decode_v2_layout.py
           step kvq_bench 170 python3 tools/bench_attention.py --sections decode --kv-dtypes fp16,int8,int4,fp8 --out "$OUT" ;;
  kvq_profile) # Nsight Compute on decode attention at 128k, batch 1 (the bench's Llama-3-8B heads): fp16 (v1 kernel) and
           # int8 / int4 (v2), the fourth launch of the decode kernel itself (not the combine): DRAM / L2 traffic and stalls,
           # where the quantized decode loses bandwidth against fp16 (docs/KV_QUANT.md)
           for kv in fp16 int8 int4; do
             impl=$( [ $kv = fp16 ] && echo v1 || echo v2 )
             step ncu_decode_$kv 200 ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
                 --section Occupancy -k 'regex:paged_attn_decode_(v2_)?d' --launch-skip 3 --launch-count 1 python3 -c \
                 "import sys; sys.path.insert(0, 'tools'); from bench_attention import ours_decode; ours_decode(131072, 1, '$kv', '$impl')"
           done ;;
  kvq_e2e) # quantized-KV benchmarks (issue 11): chunked prefill attention per KV dtype beside fp16 (spot-checked
           # against the CPU reference), the longest context per KV dtype, then Llama-3-8B-shaped prefill and batch-1
           # decode at 4k / 128k with fp16 and int8 KV (one timed prefill per context after one warm-up)
           step kvq_chunked 90 python3 tools/bench_attention.py --sections chunked --kv-dtypes fp16,int8,int4,fp8 \
               --prefill-kernels mma --no-peers --out "$OUT/kvq_chunked"
           step kvq_capacity 90 python3 tools/bench_e2e.py --capacity --out "$OUT/kvq_capacity.json"
           for kv in fp16 int8; do
             step llama_kv_$kv 160 python3 tools/bench_e2e.py --skip smollm2 --skip smollm2-lserve --skip splits \
                 --kv-dtype $kv --llama-contexts 4096 131072 --llama-prefill-reps 1 --out "$OUT/llama_kv_$kv.json"
           done ;;
  smol_tests) # the default model's GGUF on the GPU: end-to-end vs the CPU, packed Q4_1 weights, grammar-mask cost
           g=${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf}
           step structured 100 python3 tools/bench_structured.py --model $g --gpu --out "$OUT/bench_structured_gpu.json"
           step smol_tests 240 env LSERVE_SMOLLM2_GGUF=$g python3 -m pytest -p no:cacheprovider -m gpu -q \
               tests/test_gpu_e2e.py tests/test_gpu_quant.py::test_smollm2_q4_1_gguf_on_the_gpu ;;
  ruler)   # the RULER-style suite on the GPU (docs/ACCURACY.md): float weights (fp16 on the GPU) with four sparse
           # settings at 2k/4k/8k, max vs mass at 4k/8k, then dense vs LServe per KV format and with the GGUF's
           # packed Q4_1 weights. --time-limit counts from the start, model load (20-50 s) included.
           f=${LSERVE_SMOLLM2_DIR:-/tmp/lserve_smollm2_hf}; g=${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf}
           [ -f $f/config.json ] || python3 -m lserve_lite.cli convert $g $f
           pat=lserve_lite/sparse/patterns/SmolLM2-135M-Instruct/full_attention_heads.tsv
           tasks=niah_single_numbers,niah_single_words,niah_multikey_numbers,niah_multikey_words,niah_multivalue
           ev() { local name=$1 limit=$2; shift 2; step "ruler_$name" $((limit + 60)) python3 -m lserve_lite.cli eval \
               --backend cuda --pattern $pat --tasks $tasks --samples 100 --shared-dense \
               --time-limit "$limit" --out "$OUT/ruler_gpu_$name" "$@"; }
           L=2048,4096,8000
           mx=group_reduce=max  # the runs of 2026-12-02 (max was the default then; mass is now)
           ev fp16 210 --model $f --lengths $L --configs "dense;lserve:$mx;lserve-b1024:token_budget=1024,$mx;lserve-b2048:token_budget=2048,$mx"
           ev mass 200 --model $f --lengths 4096,8000 --configs "dense;lserve:$mx;lserve-mass:group_reduce=mass;lserve-b2048-mass:token_budget=2048,group_reduce=mass"
           for kv in int8 int4 fp8; do ev kv_$kv 85 --model $f --lengths $L --kv-dtype $kv --configs "dense;lserve:$mx"; done
           ev w_int8 85 --model $f --lengths $L --quantize int8 --configs "dense;lserve:$mx"
           ev w_q4_1 85 --model $g --lengths $L --configs "dense;lserve:$mx" ;;
  subpages) # sub_pages 8 (docs/ACCURACY.md "Why selection loses retrievals"): the suite at 8000 tokens and the selector's cost
           f=${LSERVE_SMOLLM2_DIR:-/tmp/lserve_smollm2_hf}; g=${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf}
           [ -f $f/config.json ] || python3 -m lserve_lite.cli convert $g $f
           step selector_s8 120 python3 tools/bench_sparse.py --selector-only --sub-pages 8 --out "$OUT"
           step ruler_s8 300 python3 -m lserve_lite.cli eval --backend cuda --model $f --lengths 8000 --samples 100 \
               --pattern lserve_lite/sparse/patterns/SmolLM2-135M-Instruct/full_attention_heads.tsv --shared-dense \
               --tasks niah_single_numbers,niah_single_words,niah_multikey_numbers,niah_multikey_words \
               --configs "dense;lserve;max:group_reduce=max;s8:sub_pages=8;max-s8:sub_pages=8,group_reduce=max" \
               --time-limit 240 --out "$OUT/ruler_gpu_s8" ;;
  overlap) # the overlapped decode step (opt-in): its GPU test, then SmolLM2 batch-1 decode with and without it
           g=${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf}
           step overlap_tests 200 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_overlap.py tests/test_gpu_graphs_sparse.py
           step overlap_bench 200 env LSERVE_SMOLLM2_GGUF=$g python3 tools/bench_e2e.py --skip llama --skip splits --out "$OUT/smol_overlap.json" ;;
  split)   # the split-layout GEMV: harness rows and GPU tests, then its speed beside the block kernel v2
           step split_tests 300 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_quant.py -k "not smollm2"
           step split_bench 360 python3 tools/bench_quant_gpu.py --formats int8 int4 q4_1 q8_0 q4_k q6_k --variants split v2 --batches 1 8 --prefill-rows 4096 --out "$OUT/bench_quant_gpu.json" ;;
  wgmma)   # the Hopper prefill: both kernels against the reference and timed, then beside SDPA / cuDNN
           step wgmma_check 120 python3 tools/check_prefill_sm90.py --out "$OUT/check_prefill_sm90.json"
           step wgmma_bench 200 python3 tools/bench_attention.py --sections prefill --prefill-kernels mma,wgmma --out "$OUT" ;;
  pdl)     # programmatic dependent launch in captured graphs: PDL graphs vs eager (bitwise chain, whole models),
           # then Llama-3-8B-shaped batch-1 decode at 4k with it off and on (LSERVE_PDL=0 / 1)
           step pdl_tests 300 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_pdl.py tests/test_gpu_overlap.py \
               tests/test_gpu_graphs_sparse.py tests/test_gpu_ops.py::test_forward_matches_cpu_and_graphs_match_eager \
               tests/test_gpu_quant.py::test_quantized_llama_cuda_vs_cpu_and_graphs_vs_eager
           for q in ${PDL_WEIGHTS:-fp16}; do for p in 0 1; do
             step llama_${q}_pdl$p 200 env LSERVE_PDL=$p python3 tools/bench_e2e.py --skip smollm2 --skip splits \
                 $( [ $q = fp16 ] || echo --quantize $q ) --llama-contexts 4096 --out "$OUT/llama_${q}_pdl$p.json"
           done; done ;;
  fuse)    # the fused decode kernels (gate_up GEMV + SiLU-and-multiply): harness rows, GPU tests, then Llama-3-8B-shaped
           # batch-1 decode at 4k per weight format, fused (default) and not (LSERVE_CUDA_FUSE_SILU=0)
           step fuse_kernels 200 python3 -m lserve_lite.cli kernels test gate_up_silu quant_gate_up_silu linear quant_gemv --json "$OUT/fuse_kernels.json"
           step fuse_tests 300 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_pdl.py \
               tests/test_gpu_ops.py::test_forward_matches_cpu_and_graphs_match_eager tests/test_gpu_quant.py -k "not smollm2"
           for q in ${FUSE_WEIGHTS:-fp16 int8 int4}; do for f in 1 0; do
             step llama_${q}_fuse$f 200 env LSERVE_CUDA_FUSE_SILU=$f python3 tools/bench_e2e.py --skip smollm2 --skip smollm2-lserve \
                 --skip splits $( [ $q = fp16 ] || echo --quantize $q ) --llama-contexts 4096 --out "$OUT/llama_${q}_fuse$f.json"
           done; done ;;
  norm)    # the residual add + RMSNorm in the prologue of the decode GEMVs (rmsnorm_linear): harness rows, GPU tests, then
           # the A/B of LSERVE_CUDA_FUSE_NORM (step ab)
           step norm_kernels 200 python3 -m lserve_lite.cli kernels test rmsnorm_linear add_rmsnorm gate_up_silu \
               quant_gate_up_silu linear quant_gemv --json "$OUT/norm_kernels.json"
           step norm_tests 300 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_pdl.py tests/test_gpu_overlap.py \
               tests/test_gpu_graphs_sparse.py tests/test_gpu_ops.py tests/test_gpu_quant.py -k "not smollm2" ;;
  smol_peer) # SmolLM2 from its GGUF (packed Q4_1) beside llama.cpp's CUDA build on the same file, then the norm A/B
           # (LSERVE_CUDA_FUSE_NORM=0); llama-bench from .device/llama.cpp/build-cuda.sh, or $LLAMA_BENCH
           g=${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf}; lb=${LLAMA_BENCH:-/tmp/lb/bin/llama-bench}
           step smol_peer 300 env LSERVE_SMOLLM2_GGUF=$g python3 tools/bench_e2e.py --skip llama --skip splits \
               $( [ -x $lb ] && echo --llama-bench $lb ) --out "$OUT/smol_peer.json"
           step smol_nonorm 200 env LSERVE_CUDA_FUSE_NORM=0 LSERVE_SMOLLM2_GGUF=$g python3 tools/bench_e2e.py --skip llama \
               --skip splits --skip smollm2-lserve --out "$OUT/smol_nonorm.json" ;;
  ab)      # Llama-3-8B-shaped batch-1 decode at 4k per weight format with a switch off and on: AB=LSERVE_CUDA_FUSE_SILU
           # (default), LSERVE_PDL, ...
           v=${AB:-LSERVE_CUDA_FUSE_SILU}
           for q in ${AB_WEIGHTS:-fp16 int8 int4}; do for f in 1 0; do
             step llama_${q}_${v}_$f 200 env $v=$f python3 tools/bench_e2e.py --skip smollm2 --skip smollm2-lserve \
                 --skip splits $( [ $q = fp16 ] || echo --quantize $q ) --llama-contexts 4096 --out "$OUT/llama_${q}_${v}_$f.json"
           done; done ;;
  batches) # Llama-3-8B-shaped decode at batch 1 / 8 / 32, 32k and 128k (graph replay; rows past the KV budget share pages)
           step llama_batches 300 python3 tools/bench_e2e.py --skip smollm2 --skip smollm2-lserve --skip splits \
               --llama-contexts 32768 131072 --llama-batches 8 32 --out "$OUT/llama_batches.json" ;;
  pdl_smol) # SmolLM2 (the GGUF): batch-1 / batch-64 decode and the replay per batch size, PDL off and on
           for p in 0 1; do
             step smol_pdl$p 200 env LSERVE_PDL=$p LSERVE_SMOLLM2_GGUF=${LSERVE_SMOLLM2_GGUF:-/tmp/smollm2.gguf} \
                 python3 tools/bench_e2e.py --skip llama --skip splits --out "$OUT/smol_pdl$p.json"
           done ;;
  tp)      # tensor parallelism: world 1 through NCCL on any GPU count; world 2 and the figures with 2+ GPUs
           step tp 400 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_tp.py
           step tp_bench 300 python3 tools/bench_tp.py --tensor-parallel 1 $( [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && echo 2 ) --out "$OUT/bench_tp.json" ;;
  selector) step selector_tests 300 env LSERVE_SELECTOR=numba python3 -m pytest -p no:cacheprovider -m gpu -q \
               tests/test_gpu_sparse.py tests/test_gpu_graphs_sparse.py
            step selector_bench 200 python3 tools/bench_sparse.py --selector-only --out "$OUT" ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
