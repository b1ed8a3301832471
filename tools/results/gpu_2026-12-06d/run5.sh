# Last call (what the device budget left): LServe decode A/B at 64k (Llama-3-8B shape, int8 KV): fp16 weights
# (gemv_rows' epilogue) fused / unfused, int8 weights with the quantized rope GEMV on its full grid
# (fullgrid_qwrite.py) / unfused, alternating; then the engine-level quantized epilogue tests if time is left.
# OUT=dir bash tools/results/gpu_2026-12-06d/run5.sh
set -u
. .device/on-device.sh
nvidia-smi --query-gpu=name --format=csv,noheader
end=$(($(date +%s) + ${DEADLINE:-200}))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
d=tools/results/gpu_2026-12-06d
ab() {  # label, weights flag, kv, fuse, script
  [ $(( end - $(date +%s) )) -lt 25 ] && { echo "no time for $1"; return; }
  t0=$(date +%s)
  LSERVE_CUDA_FUSE_ROPE_QUANT=$4 timeout $(left 90) python3 $5 --sparse --sparse-contexts 65536 --sparse-modes sparse \
    --deadline 1 --sparse-decode-steps 24 $2 --kv-dtype $3 --out /tmp/e2e_$1.json > /tmp/e2e_$1.log 2>&1
  echo "$1 rc=$? $(( $(date +%s) - t0 )) s $(grep -E "decode replay" /tmp/e2e_$1.log | cut -c50-110) | $(grep -E "overlapped" /tmp/e2e_$1.log | cut -c50-110)"
  grep -E "Error" /tmp/e2e_$1.log | head -3
}
B=tools/bench_e2e.py
ab f16w_fused "" int8 1 $B; ab f16w_unfused "" int8 0 $B
ab i8w_fullgrid "--quantize int8" int8 1 $d/fullgrid_qwrite.py; ab i8w_unfused "--quantize int8" int8 0 $B
ab f16w_fused2 "" int8 1 $B; ab f16w_unfused2 "" int8 0 $B
ab i8w_fullgrid2 "--quantize int8" int8 1 $d/fullgrid_qwrite.py; ab i8w_unfused2 "--quantize int8" int8 0 $B
[ $(( end - $(date +%s) )) -gt 30 ] && { timeout $(left 120) python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short \
  tests/test_gpu_qkv_rope.py -k "engine_quantized" > "$OUT/engine_q.log" 2>&1
  echo "engine_quantized rc=$? $(tail -n 1 "$OUT/engine_q.log")"; grep -E "^(FAILED|E  )" "$OUT/engine_q.log" | head -8; }
