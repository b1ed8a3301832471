# Call 4 (if time is left): where int8 KV's extra time goes in LServe decode (64k, Llama-3-8B shape, int8 weights):
# ncu kernel times of 4 engine decode steps (one selector refresh among them), int8 KV then fp16 KV.
# OUT=dir bash tools/results/gpu_2026-12-06e/run4.sh
set -u
. .device/on-device.sh
for kv in int8 fp16; do
  timeout 140 ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file "$OUT/prof_$kv.csv" \
    python3 tools/bench_e2e.py --sparse --sparse-contexts 65536 --sparse-modes sparse --deadline 1 \
    --sparse-decode-steps 8 --quantize int8 --kv-dtype $kv --sparse-profile-steps 4 --out /tmp/p_$kv.json > /tmp/p_$kv.log 2>&1
  echo "ncu $kv rc=$?"
  python3 tools/profile_decode.py --summarize "$OUT/prof_$kv.csv" --steps 4 --out "$OUT/prof_$kv.json" 2>&1 | head -30
done
