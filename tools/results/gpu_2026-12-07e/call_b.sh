# The session's second device call (README here): the GPU tests of the pinned soundness flags (sample_async), then
# the host-overhead A/B of main against the commit before it (OLD, the same kernels: one compile), then the engine's
# other GPU test files while TOTAL seconds last. OUT=dir OLD=commit [TOTAL=s] bash .../call_b.sh
# (carry .device/whl, .device/smolcfg and .device/on-device.sh: call B of 2026-12-07 left the last out)
L=/tmp/logs_f; . tools/results/gpu_2026-12-06g/prelude.sh
t0=$(date +%s)
step() {  # a GPU test file, if TOTAL leaves room
  rem=$(( ${TOTAL:-570} - ($(date +%s) - t0) ))
  [ $rem -lt 30 ] && { echo "not run: $1"; return; }
  timeout $rem python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/$1.py > $L/$1.log 2>&1
  echo "$1 rc=$? $(tail -n 1 $L/$1.log) at $(( $(date +%s) - t0 )) s"
  grep -E "^(FAILED|ERROR)" $L/$1.log | head -6
}
step test_gpu_overlap
step test_overflowing_weights
python3 tools/results/gpu_2026-12-07e/rand_smol.py .device/smolcfg /tmp/smolrand
REM=150 FIRST=20 ROUNDS=3 bash tools/results/gpu_2026-12-07e/ab_host.sh 2>&1 | grep -E "decode \(engine\)|decode \(engine, sync\)|replay in run|took|not run"
echo "ab done at $(( $(date +%s) - t0 )) s"
for f in test_gpu_quant test_gpu_kv_quant test_gpu_sparse; do step $f; done
