# The short form of call.sh when little device time is left: the two measurements alone.
# OUT=dir bash tools/results/gpu_2026-12-07g/call_short.sh  (carry .device/whl, .device/on-device.sh)
set -u
. .device/on-device.sh
nvidia-smi --query-gpu=name --format=csv,noheader
t0=$(date +%s)
timeout 100 python3 tools/results/gpu_2026-12-07g/mlp_persist.py --json "$OUT/mlp_persist.json" 2>&1 | tail -12
echo "mlp_persist done at $(( $(date +%s) - t0 )) s"
timeout 90 python3 tools/results/gpu_2026-12-07f/boundary_cost.py --reps 10 --json "$OUT/boundary.json" 2>&1 | tail -26
echo "boundary_cost done at $(( $(date +%s) - t0 )) s"
