# The first device call of 2026-12-08 (README here): the spread norm's GPU tests, its A / B on decode replays, then
# test_gpu_qkv_rope (qkv_rope's RopeOut set-up moved into CudaOps._rope_out).
# OUT=dir [TOTAL=s] bash tools/results/gpu_2026-12-08a/call.sh  (carry .device/whl, .device/on-device.sh)
L=/tmp/logs_h; . tools/results/gpu_2026-12-06g/prelude.sh
t0=$(date +%s)
timeout 240 python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_spread.py \
  "tests/test_gpu_ops.py::test_kernel_against_reference[spread_norm]" > $L/spread_tests.log 2>&1
echo "spread tests rc=$? $(tail -n 1 $L/spread_tests.log) at $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|Error|assert" $L/spread_tests.log | head -20
rem=$(( ${TOTAL:-570} - 90 - ($(date +%s) - t0) ))
timeout $rem python3 tools/results/gpu_2026-12-08a/spread_ab.py --json "$OUT/spread_ab.json" 2>&1 | tail -8
echo "spread_ab done at $(( $(date +%s) - t0 )) s"
rem=$(( ${TOTAL:-570} - ($(date +%s) - t0) ))
timeout $rem python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_qkv_rope.py > $L/qkv_rope.log 2>&1
echo "test_gpu_qkv_rope rc=$? $(tail -n 1 $L/qkv_rope.log) at $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)" $L/qkv_rope.log | head -6
