# The next device session's first calls, for what this session changed without a GPU (README here):
#   call A: OUT=dir PART=0 bash tools/results/gpu_2026-12-07d/next.sh   (carry .device/model/smol.part00)
#   call B: OUT=dir PART=1 ...                                           (carry smol.part01)
#   call C: OUT=dir PART=2 ...                                           (carry smol.part02 and .device/whl: runs all)
# A and B only gather the model's parts (the carry limit); C runs the sampling harness (the fused argmax_rows + sound
# row), the GPU tests of the paths changed (the overlapped step's flags, the overflow check, the server), then
# ab_host.sh (main against 76b70ae, alternating) within TOTAL seconds.
set -u
. .device/on-device.sh
[ "${PART:-2}" != 2 ] && exit 0
export LSERVE_SMOLLM2_GGUF=/tmp/smollm2.gguf
t0=$(date +%s)
timeout 240 python3 -m lserve_lite.cli kernels test sampling 2>&1 | tail -4
timeout 240 python3 -m pytest -p no:cacheprovider -m gpu -q -rf tests/test_gpu_overlap.py \
  tests/test_overflowing_weights.py tests/test_gpu_api.py tests/test_gpu_e2e.py 2>&1 | tail -6
echo "tests done at $(( $(date +%s) - t0 )) s"
[ $(( $(date +%s) - t0 )) -lt $(( ${TOTAL:-560} - 300 )) ] && bash tools/results/gpu_2026-12-07d/ab_host.sh
