# Call 1 (fresh machine): the harness rows' q-bound fix (test_gpu_kv_quant's epilogue cases, not run on a GPU since);
# then prefetch.diff (branch rope-prefetch: rope_write_kv(_sparse) read the plan and prefetch cos / sin before
# pdl_enter) applied to this machine's copy: the tests of the kernels it touches, then LServe decode at 64k
# (Llama-3-8B shape, int8 weights) main / prefetch alternating, int8 and fp16 KV.
# OUT=dir bash tools/results/gpu_2026-12-06f/run1.sh
set -u
. .device/on-device.sh
nvidia-smi --query-gpu=name --format=csv,noheader
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }
timeout 150 python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_kv_quant.py -k "epilogue" \
  > "$OUT/epilogue.log" 2>&1
echo "epilogue rc=$? $(tail -n 1 "$OUT/epilogue.log") $(el) s"; grep -E "^(FAILED|ERROR)" "$OUT/epilogue.log" | head -8
P=tools/results/gpu_2026-12-06f/prefetch.diff
git apply $P && echo "prefetch applied"
timeout 240 python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_kv_quant.py \
  tests/test_gpu_qkv_rope.py tests/test_gpu_graphs_sparse.py -k "rope or engine or stale or graph or sparse" \
  > "$OUT/prefetch_tests.log" 2>&1
echo "prefetch tests rc=$? $(tail -n 1 "$OUT/prefetch_tests.log") $(el) s"; grep -E "^(FAILED|ERROR)" "$OUT/prefetch_tests.log" | head -8
ab() {  # label, kv
  [ $(el) -gt 540 ] && { echo "no time for $1"; return; }
  timeout 80 python3 tools/bench_e2e.py --sparse --sparse-contexts 65536 --sparse-modes sparse --deadline 1 \
    --sparse-decode-steps 24 --quantize int8 --kv-dtype $2 --out "$OUT/e2e_$1.json" > /tmp/e2e_$1.log 2>&1
  echo "$1 rc=$? $(el) s $(grep -E "decode replay" /tmp/e2e_$1.log | cut -c50-110) | $(grep -E "overlapped" /tmp/e2e_$1.log | cut -c50-110)"
  grep -E "Error" /tmp/e2e_$1.log | head -3
}
for i in 1 2 3; do
  ab pre_i8_$i int8; git apply -R $P; ab main_i8_$i int8; ab main_f16_$i fp16; git apply $P; ab pre_f16_$i fp16
done
git checkout kernels/
