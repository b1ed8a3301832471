# Call 6 (a fresh machine, H200 if one is lent; what the device budget left): LServe and dense decode at 256k, Llama-3-8B
# shape, int8 weights, fp16 / int8 KV alternating (issue 11's "LServe with int8 KV no slower" and "dense >= 1.6x"),
# after the K/V write's plan-before-wait change; then fp16 weights at 256k if time is left.
# OUT=dir [TOTAL=s] bash tools/results/gpu_2026-12-06f/run3.sh
set -u
. .device/on-device.sh
nvidia-smi --query-gpu=name --format=csv,noheader
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }
run() {  # label, then bench_e2e arguments
  local l=$1; shift
  [ $(el) -gt $(( ${TOTAL:-400} - 60 )) ] && { echo "no time for $l"; return; }
  timeout 150 python3 tools/bench_e2e.py --sparse --sparse-contexts 262144 --deadline 1 --sparse-decode-steps 24 "$@" \
    --out "$OUT/$l.json" > "$OUT/$l.log" 2>&1
  echo "$l rc=$? $(el) s"; grep -E "decode replay|overlapped" "$OUT/$l.log" | cut -c1-120; grep -E "Error" "$OUT/$l.log" | head -3
  rm -f "$OUT/$l.png"
}
for i in 1; do
  run i8w_f16kv_$i --sparse-modes sparse dense --quantize int8 --kv-dtype fp16
  run i8w_i8kv_$i --sparse-modes sparse dense --quantize int8 --kv-dtype int8
done
run f16w_f16kv --sparse-modes sparse dense --kv-dtype fp16
run f16w_i8kv --sparse-modes sparse dense --kv-dtype int8
