# After the session's engine, server and loader changes (no kernel change): the engine-level GPU tests (LServe
# graphs vs eager with the new streaming-only case, overlapped steps, prefix cache, the one-GPU tensor-parallel
# path), the API and quantized-weights tests, each file bounded by what is left of DEADLINE.
# OUT=dir bash tools/results/gpu_2026-12-06b/run_engine_checks.sh  (carry .device/whl, .device/on-device.sh)
set -u
. .device/on-device.sh
end=$(($(date +%s) + ${DEADLINE:-540}))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
for f in test_gpu_graphs_sparse test_gpu_overlap test_gpu_prefix_cache test_gpu_api test_gpu_tp test_gpu_quant; do
  timeout $(left 240) python3 -m pytest -p no:cacheprovider -m gpu -q tests/$f.py > "$OUT/pytest_$f.log" 2>&1
  echo "$f rc=$? $(tail -n 1 "$OUT/pytest_$f.log") $(date +%T)"
done
