# One call (the device is scarce): the quantized write epilogue's tests and A/B (run_qwrite.sh), with the engine
# tests of what merged after the last GPU run (overlap, API, LServe graphs, prefix cache) and clear_pages' check.
# OUT=dir bash tools/results/gpu_2026-12-06d/run3.sh  (carry .device/whl, .device/on-device.sh)
set -u
. .device/on-device.sh
nvidia-smi --query-gpu=name --format=csv,noheader
end=$(($(date +%s) + ${DEADLINE:-565}))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
timeout $(left 240) python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_qkv_rope.py \
  tests/test_gpu_kv_quant.py > "$OUT/tests.log" 2>&1
echo "qkv_rope+kv_quant rc=$? $(tail -n 1 "$OUT/tests.log") $(date +%T)"; grep -E "^(FAILED|E  )" "$OUT/tests.log" | head -12
common="--sparse --sparse-contexts ${CTX:-65536} --sparse-modes sparse --quantize int8 --deadline 1 --sparse-decode-steps 24"
for v in fused unfused fp16 fused unfused; do
  [ $(( end - $(date +%s) )) -lt 150 ] && { echo "no time for $v"; break; }
  kv=int8; fuse=1; [ $v = unfused ] && fuse=0; [ $v = fp16 ] && kv=fp16
  t0=$(date +%s)
  LSERVE_CUDA_FUSE_ROPE_QUANT=$fuse timeout $(left 100) python3 tools/bench_e2e.py $common --kv-dtype $kv \
    --out /tmp/e2e_$v.json > /tmp/e2e_$v.log 2>&1
  echo "$v rc=$? $(( $(date +%s) - t0 )) s"; grep -E "decode (step|replay)" /tmp/e2e_$v.log | cut -c1-110; grep -E "Error" /tmp/e2e_$v.log | head -3
done
timeout $(left 100) python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_overlap.py \
  tests/test_gpu_api.py tests/test_gpu_graphs_sparse.py tests/test_gpu_prefix_cache.py > "$OUT/engine.log" 2>&1
echo "engine tests rc=$? $(tail -n 1 "$OUT/engine.log") $(date +%T)"; grep -E "^(FAILED|E  )" "$OUT/engine.log" | head -8
timeout $(left 40) python3 tools/results/gpu_2026-12-06c/clear_cost.py 2>&1 | tail -6
