# The next device call (README here, "Next"): the boundary-cost question first (about a minute), then the GPU test
# files not rerun in this session, while TOTAL seconds last. OUT=dir [TOTAL=s] bash .../call_next.sh
# (carry .device/whl, .device/smolcfg and .device/on-device.sh)
L=/tmp/logs_n; . tools/results/gpu_2026-12-06g/prelude.sh
t0=$(date +%s)
timeout 150 python3 tools/results/gpu_2026-12-07f/boundary_cost.py --json "$OUT/boundary.json" 2>&1 | tail -30
echo "boundary_cost done at $(( $(date +%s) - t0 )) s"
export TOTAL=$(( ${TOTAL:-570} - ($(date +%s) - t0) ))
FILES="${FILES:-test_gpu_pdl test_gpu_prefix_cache test_gpu_api test_gpu_qkv_rope test_gpu_attention test_gpu_kv_quant test_gpu_bf16_prefill test_gpu_ops}" \
  bash tools/results/gpu_2026-12-07f/call_a.sh 2>&1 | grep -v "^NVIDIA\|^numpy"
