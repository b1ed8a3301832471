# The fifth 2026-12-07 session's first device call (README here): the GPU tests of what changed since the last GPU run
# (argmax_rows' fused flags, the synchronous step's one readback, the engine's split), then the host-overhead A/B of
# main against 76b70ae (2026-12-06) on a random SmolLM2-shaped fp16 model (ab_host.sh), within TOTAL seconds.
# OUT=dir [TOTAL=s] bash tools/results/gpu_2026-12-07e/call_a.sh   (carry .device/whl, .device/smolcfg, .device/on-device.sh)
L=/tmp/logs_e; . tools/results/gpu_2026-12-06g/prelude.sh
t0=$(date +%s)
python3 -c "import cupy; from cupy.cuda import nvrtc; print('cupy', cupy.__version__, 'nvrtc', nvrtc.getVersion())"
timeout 200 python3 -m lserve_lite.cli kernels test sampling > $L/harness_sampling.log 2>&1
echo "harness sampling rc=$? $(tail -n 2 $L/harness_sampling.log | tr '\n' ' ') at $(( $(date +%s) - t0 )) s"
grep -i "fail" $L/harness_sampling.log | head -5
for f in test_overflowing_weights test_gpu_overlap test_gpu_graphs_sparse test_gpu_prefix_cache test_gpu_api; do
  rem=$(( ${TOTAL:-580} - 240 - ($(date +%s) - t0) ))
  [ $rem -lt 20 ] && { echo "not run: $f"; continue; }
  timeout $rem python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/$f.py > $L/$f.log 2>&1
  echo "$f rc=$? $(tail -n 1 $L/$f.log) at $(( $(date +%s) - t0 )) s"
  grep -E "^(FAILED|ERROR)" $L/$f.log | head -6
done
python3 tools/results/gpu_2026-12-07e/rand_smol.py .device/smolcfg /tmp/smolrand
rem=$(( ${TOTAL:-580} - ($(date +%s) - t0) - 10 ))
[ $rem -gt 60 ] && REM=$rem bash tools/results/gpu_2026-12-07e/ab_host.sh
