# The next call for the spread norm (README here): its engine test alone first, with its report (the first call's
# 240 s limit cut pytest before it said which assertion failed), then the harness case, then what TOTAL leaves of
# the GPU tests not run since the engine step's split. OUT=dir [TOTAL=s] bash tools/results/gpu_2026-12-08a/call2.sh
# (carry .device/whl, .device/smolcfg, .device/on-device.sh)
L=/tmp/logs_i; . tools/results/gpu_2026-12-06g/prelude.sh
t0=$(date +%s)
timeout 300 python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_spread.py > $L/spread_engine.log 2>&1
echo "test_gpu_spread rc=$? $(tail -n 1 $L/spread_engine.log) at $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|^E " $L/spread_engine.log | head -12
export TOTAL=$(( ${TOTAL:-560} - ($(date +%s) - t0) ))
FILES="${FILES:-test_gpu_ops test_gpu_overlap test_gpu_graphs_sparse test_gpu_api test_gpu_prefix_cache}" \
  bash tools/results/gpu_2026-12-07f/call_a.sh 2>&1 | grep -v "^NVIDIA\|^numpy"
