# The quantized K/V write in the q/k/v GEMV's epilogue (branch qwrite): its GPU tests (fused against unfused, bit for
# bit; the engine's quantized-KV tests, which now take it at batch 1), then LServe decode (Llama-3-8B shape, int8
# weights, random K/V at CTX) with int8 KV fused / unfused and fp16 KV, alternating.
# OUT=dir bash tools/results/gpu_2026-12-06d/run_qwrite.sh  (carry .device/whl, .device/on-device.sh)
set -u
. .device/on-device.sh
nvidia-smi --query-gpu=name --format=csv,noheader
end=$(($(date +%s) + ${DEADLINE:-570}))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
timeout $(left 240) python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_qkv_rope.py \
  tests/test_gpu_kv_quant.py > "$OUT/tests.log" 2>&1
echo "tests rc=$? $(tail -n 1 "$OUT/tests.log") $(date +%T)"; grep -E "^(FAILED|E  )" "$OUT/tests.log" | head -12
common="--sparse --sparse-contexts ${CTX:-65536} --sparse-modes sparse --quantize int8 --deadline 1 --sparse-decode-steps 24"
for v in fused unfused fp16 fused unfused; do
  [ $(( end - $(date +%s) )) -lt 45 ] && { echo "no time for $v"; break; }
  kv=int8; fuse=1; [ $v = unfused ] && fuse=0; [ $v = fp16 ] && kv=fp16
  t0=$(date +%s)
  LSERVE_CUDA_FUSE_ROPE_QUANT=$fuse timeout $(left 110) python3 tools/bench_e2e.py $common --kv-dtype $kv \
    --out /tmp/e2e_$v.json > /tmp/e2e_$v.log 2>&1
  echo "$v rc=$? $(( $(date +%s) - t0 )) s"; grep -E "decode (step|replay)" /tmp/e2e_$v.log | cut -c1-110; grep -E "Error" /tmp/e2e_$v.log | head -3
done
