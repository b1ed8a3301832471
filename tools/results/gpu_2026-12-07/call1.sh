# Call 1 (fresh machine): the whole kernel harness (its first NVRTC compiles take most of the time), then the prefix
# cache's GPU tests (the snapshot restore that copies only the prefix slots, not yet run on a GPU). Logs: $OUT/logs1.tgz.
# OUT=dir [TOTAL=s] bash tools/results/gpu_2026-12-07/call1.sh
L=/tmp/logs1; . tools/results/gpu_2026-12-06g/prelude.sh
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
timeout 440 python3 -m lserve_lite.cli kernels test --json $L/kernels.json > $L/kernels.log 2>&1
echo "kernels rc=$? $(tail -n 2 $L/kernels.log | tr '\n' ' ') $(el) s"; grep -E "FAIL" $L/kernels.log | head -8
cp $L/kernels.json "$OUT/" 2>/dev/null
rem=$(( ${TOTAL:-570} - $(el) ))
[ $rem -gt 30 ] && timeout $rem python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short \
  tests/test_gpu_prefix_cache.py > $L/test_gpu_prefix_cache.log 2>&1
echo "prefix_cache rc=$? $(tail -n 1 $L/test_gpu_prefix_cache.log) $(el) s"
grep -E "^(FAILED|ERROR)" $L/test_gpu_prefix_cache.log | head -6
