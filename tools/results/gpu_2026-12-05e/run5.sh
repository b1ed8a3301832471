# Device call 5: the residual add + RMSNorm in the prologue of the batch-1 split GEMVs of small K (gate_up + SiLU,
# q/k/v + RoPE): harness rows, GPU tests, then SmolLM2-shaped int4 A/B (LSERVE_SPLIT_NORM_MAX_K=2048, the default,
# against 0) through the engine, batch 1, alternating.
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-05e
[ -d /tmp/smolr ] || python3 tools/results/gpu_2026-12-04h/6_make_random_smollm2.py weights/SmolLM2-135M-Instruct /tmp/smolr > /dev/null 2>&1
timeout 240 python3 -m lserve_lite.cli kernels test rmsnorm_linear qkv_rope > "$OUT/9_harness_norm.log" 2>&1
echo "harness rc=$? $(tail -n 2 "$OUT/9_harness_norm.log" | tr '\n' ' ')"
for i in 1 2; do for k in 2048 0; do
  LSERVE_SPLIT_NORM_MAX_K=$k timeout 100 python3 $R/ab_steps.py /tmp/smolr nk$k dense int4 512 4096 \
    >> "$OUT/10_ab_split_norm.log" 2>&1; echo "nk$k rc=$?"
done; done
for k in 2048 0; do
  LSERVE_SPLIT_NORM_MAX_K=$k timeout 100 python3 $R/ab_steps.py /tmp/smolr nk$k lserve int4 512 \
    >> "$OUT/10_ab_split_norm.log" 2>&1; echo "lserve nk$k rc=$?"
done
timeout 200 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_quant.py tests/test_gpu_pdl.py -k "not smollm2" \
  > "$OUT/11_pytest_norm.log" 2>&1; echo "pytest rc=$? $(tail -n 1 "$OUT/11_pytest_norm.log")"
