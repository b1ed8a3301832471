# Sourced by run2.sh / run3.sh on the device machine, with L=/tmp/<logs folder> set: installs the carried wheels,
# prints the GPU, applies decode_prefetch.diff when PREFETCH=1, and on exit tars $L into $OUT and restores the tree.
set -u
. .device/on-device.sh
nvidia-smi --query-gpu=name --format=csv,noheader
[ "${PREFETCH:-0}" = 1 ] && git apply tools/results/gpu_2026-12-06g/decode_prefetch.diff && echo "decode_prefetch applied"
mkdir -p "$L"
trap 'tar czf "$OUT/$(basename "$L").tgz" -C "$(dirname "$L")" "$(basename "$L")"; git checkout kernels/ lserve_lite/ tests/ tools/gpu_check.sh README.md' EXIT
