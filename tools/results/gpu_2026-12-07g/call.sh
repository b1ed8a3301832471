# This session's device call (README here): is a persistent layer kernel worth building? Two measurements, then
# the GPU test files not rerun since the last kernel change, while TOTAL seconds last.
# OUT=dir [TOTAL=s] bash tools/results/gpu_2026-12-07g/call.sh  (carry .device/whl, .device/smolcfg, .device/on-device.sh)
L=/tmp/logs_g; . tools/results/gpu_2026-12-06g/prelude.sh
t0=$(date +%s)
timeout 120 python3 tools/results/gpu_2026-12-07g/mlp_persist.py --json "$OUT/mlp_persist.json" 2>&1 | tail -12
echo "mlp_persist done at $(( $(date +%s) - t0 )) s"
timeout 120 python3 tools/results/gpu_2026-12-07f/boundary_cost.py --json "$OUT/boundary.json" 2>&1 | tail -26
echo "boundary_cost done at $(( $(date +%s) - t0 )) s"
export TOTAL=$(( ${TOTAL:-560} - ($(date +%s) - t0) ))
FILES="${FILES:-test_gpu_overlap test_gpu_graphs_sparse test_gpu_api test_gpu_prefix_cache test_gpu_pdl test_gpu_qkv_rope test_gpu_ops test_gpu_attention test_gpu_kv_quant test_gpu_bf16_prefill}" \
  bash tools/results/gpu_2026-12-07f/call_a.sh 2>&1 | grep -v "^NVIDIA\|^numpy"
