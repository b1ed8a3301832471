# Call 1: the GPU tests not run since the last kernel / engine changes (the opt-in quantized epilogue through the
# engine; the new harness rows kv_quant.write_fused; the overlap / prefix-cache / LServe-graph engine paths after
# the recompute-rule merge), then the epilogue A/B of ../gpu_2026-12-06d/run5.sh with the time left.
# OUT=dir [TOTAL=s] bash tools/results/gpu_2026-12-06e/run1.sh
set -u
. .device/on-device.sh
nvidia-smi --query-gpu=name --format=csv,noheader
t0=$(date +%s)
timeout 270 python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short \
  tests/test_gpu_overlap.py tests/test_gpu_prefix_cache.py tests/test_gpu_graphs_sparse.py \
  "tests/test_gpu_qkv_rope.py::test_engine_quantized_fused_equals_unfused" \
  tests/test_gpu_kv_quant.py -k "rope_write or engine or stale or fused or overlap or prefix or graph" \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$OUT/tests.log") $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -12
left=$(( ${TOTAL:-560} - ($(date +%s) - t0) ))
echo "A/B with ${left} s left"
DEADLINE=$left bash tools/results/gpu_2026-12-06d/run5.sh 2>&1 | grep -v "^NVIDIA" | tee "$OUT/run5.log"
