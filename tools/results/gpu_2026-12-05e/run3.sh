# Device call 3: decode splits merged in a thread-block cluster (short dense lists): GPU tests, then SmolLM2-shaped
# A/B (LSERVE_DECODE_CLUSTER=16, the default, against 0) through the engine, batch 1, alternating.
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-05e
[ -d /tmp/smolr ] || python3 tools/results/gpu_2026-12-04h/6_make_random_smollm2.py weights/SmolLM2-135M-Instruct /tmp/smolr > /dev/null 2>&1
timeout 300 python3 -m pytest -p no:cacheprovider -m gpu -q tests/test_gpu_attention.py -k "decode" \
  tests/test_gpu_ops.py tests/test_gpu_pdl.py > "$OUT/5_pytest_cluster.log" 2>&1
echo "pytest rc=$? $(tail -n 1 "$OUT/5_pytest_cluster.log")"
for i in 1 2; do for c in 16 0; do
  LSERVE_DECODE_CLUSTER=$c timeout 100 python3 $R/ab_steps.py /tmp/smolr cl$c dense int4 256 512 896 2048 \
    >> "$OUT/6_ab_cluster_int4.log" 2>&1; echo "cl$c rc=$?"
done; done
for c in 16 0; do
  LSERVE_DECODE_CLUSTER=$c timeout 100 python3 $R/ab_steps.py /tmp/smolr cl$c dense fp16 512 \
    >> "$OUT/7_ab_cluster_fp16.log" 2>&1; echo "fp16 cl$c rc=$?"
done
