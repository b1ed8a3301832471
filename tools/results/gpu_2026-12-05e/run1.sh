# Device call 1 (2026-12-05, seventh session): the short dense decode graphs (tests, then SmolLM2-shaped A/B of the
# one-CTA threshold), then the RoPE epilogue's LServe engine steps. Run from the repository root; OUT set.
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-05e
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$OUT/gpu.txt"
python3 tools/results/gpu_2026-12-04h/6_make_random_smollm2.py weights/SmolLM2-135M-Instruct /tmp/smolr > "$OUT/0_make.log" 2>&1
echo "make rc=$?"
timeout 240 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_ops.py -k "short_decode or graphs_match" \
  > "$OUT/1_pytest_short.log" 2>&1; echo "pytest rc=$? $(tail -n 1 "$OUT/1_pytest_short.log")"
for i in 1 2; do for k in 0 4096; do
  LSERVE_DECODE_ONE_CTA_KEYS=$k timeout 150 python3 $R/ab_steps.py /tmp/smolr keys$k dense int4 256 512 896 1536 2048 3000 \
    >> "$OUT/2_ab_short_int4.log" 2>&1; echo "keys$k rc=$?"
done; done
for k in 0 1024; do
  LSERVE_DECODE_ONE_CTA_KEYS=$k timeout 120 python3 $R/ab_steps.py /tmp/smolr keys$k dense fp16 512 \
    >> "$OUT/3_ab_short_fp16.log" 2>&1; echo "fp16 keys$k rc=$?"
done
for i in 1 2; do for f in 1 0; do
  LSERVE_CUDA_FUSE_ROPE=$f timeout 120 python3 $R/ab_steps.py /tmp/smolr rope$f lserve int4 512 4096 \
    >> "$OUT/4_ab_rope_lserve.log" 2>&1; echo "rope$f rc=$?"
done; done
