# Call 1: the epilogue A/B of ../gpu_2026-12-06d/run5.sh (fp16 weights; int8 weights on the full grid) and its
# engine-level test, then the GPU test files not run since the last kernel / engine changes.
# OUT=dir bash tools/results/gpu_2026-12-06e/run1.sh
set -u
. .device/on-device.sh
t0=$(date +%s)
DEADLINE=230 bash tools/results/gpu_2026-12-06d/run5.sh 2>&1 | tee "$OUT/run5.log"
left=$(( ${TOTAL:-560} - ($(date +%s) - t0) ))
echo "tests with ${left} s left"
timeout $left python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short \
  tests/test_gpu_overlap.py tests/test_gpu_prefix_cache.py tests/test_gpu_graphs_sparse.py tests/test_gpu_kv_quant.py \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$OUT/tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -12
