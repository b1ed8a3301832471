# Device call 2: the engine-level GPU tests after the graph executor's change, then the Llama-3-8B shape at a
# 256-token context (64 decode steps: 5 pages, within one_cta_pages at head dim 128) with short graphs and without.
set -u
. .device/on-device.sh
OUT=$OUT bash tools/gpu_check.sh engine
for k in 1024 0; do
  LSERVE_DECODE_ONE_CTA_KEYS=$k timeout 200 python3 tools/bench_e2e.py --skip smollm2 --skip smollm2-lserve --skip splits \
    --llama-contexts 256 --llama-prefill-reps 1 --out "$OUT/llama_keys$k.json" > "$OUT/llama_keys$k.log" 2>&1
  echo "llama keys$k rc=$? $(grep -i 'replay' "$OUT/llama_keys$k.log" | head -3)"
done
