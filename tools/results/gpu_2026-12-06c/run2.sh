# After clear_pages kept its pool tables on the host (one upload of them and the page ids a call, as before): its GPU-vs-CPU test, its cost
# (clear_cost.py), and the stale-K/V engine tests of int8 KV (dense / LServe, eager / graphs).
# OUT=dir bash tools/results/gpu_2026-12-06c/run2.sh  (carry .device/whl, .device/on-device.sh)
set -u
. .device/on-device.sh
timeout 40 python3 tools/results/gpu_2026-12-06c/clear_cost.py > "$OUT/clear_cost2.txt" 2>&1; echo "cost rc=$?"; cat "$OUT/clear_cost2.txt"
timeout 90 python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_prefix_cache.py -k clear \
  tests/test_gpu_kv_quant.py -k "clear or (stale and int8)" > "$OUT/tests2.log" 2>&1; echo "tests rc=$? $(tail -n 1 "$OUT/tests2.log")"
