# The stale-K/V check on the GPU (with the allocator's page clears and without them) (every pool NaN-poisoned after a first run, the second run's logprobs compared bit
# for bit: tests/test_gpu_kv_quant.py -k stale), then every GPU test file but test_gpu_e2e.py, each bounded by what
# is left of DEADLINE.  OUT=dir bash tools/results/gpu_2026-12-06c/run1.sh  (carry .device/whl, .device/on-device.sh)
set -u
. .device/on-device.sh
end=$(($(date +%s) + ${DEADLINE:-560}))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout $(left 200) python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=line tests/test_gpu_kv_quant.py -k stale \
  tests/test_gpu_prefix_cache.py > "$OUT/stale.log" 2>&1
echo "stale rc=$? $(tail -n 1 "$OUT/stale.log") $(date +%T)"; grep -E "^(FAILED|E )" "$OUT/stale.log" | head -20
# the same stale-K/V tests with the allocator's clears turned off (the code before 2026-12-06's fix): expected to fail
timeout $(left 120) python3 -c "import sys, pytest; from lserve_lite.kv import block_manager as B
B.BlockManager._clear = lambda self, pages, stream: None
sys.exit(pytest.main(['-p', 'no:cacheprovider', '-m', 'gpu', '-q', '-rf', '--tb=no', 'tests/test_gpu_kv_quant.py', '-k', 'stale']))" \
  > "$OUT/stale_noclear.log" 2>&1
echo "stale_noclear rc=$? $(tail -n 1 "$OUT/stale_noclear.log") $(date +%T)"
for f in ${FILES:-test_gpu_graphs_sparse test_gpu_overlap test_gpu_prefix_cache test_gpu_api test_gpu_tp test_gpu_pdl test_gpu_qkv_rope test_gpu_quant test_gpu_ops test_gpu_attention test_gpu_bf16_prefill test_gpu_kv_quant test_gpu_sparse}; do
  timeout $(left 300) python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=line tests/$f.py > "$OUT/pytest_$f.log" 2>&1
  echo "$f rc=$? $(tail -n 1 "$OUT/pytest_$f.log") $(date +%T)"; grep -E "^FAILED" "$OUT/pytest_$f.log" | head -5
done
