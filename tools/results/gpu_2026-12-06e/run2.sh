# Call 2 (same warm machine; carries the model's first part): the kernel harness on the K/V write kernels; then an
# experiment (acqrel.diff, applied to this machine's copy only): the fused quantized write's ticket as one
# atom.acq_rel instead of fence + atomicAdd (and __syncwarp instead of the finisher's fence): its bit-exact tests,
# then LServe decode at 64k, int8 KV, int8 weights, fused / unfused alternating.
# OUT=dir bash tools/results/gpu_2026-12-06e/run2.sh
set -u
. .device/on-device.sh
nvidia-smi --query-gpu=name --format=csv,noheader
t0=$(date +%s)
timeout 100 python3 -m lserve_lite.cli kernels test qkv_rope kv_quant --json "$OUT/harness.json" > "$OUT/harness.log" 2>&1
echo "harness rc=$? $(( $(date +%s) - t0 )) s"; grep -iE "fail|rows" "$OUT/harness.log" | head -8; tail -n 2 "$OUT/harness.log"
git apply tools/results/gpu_2026-12-06e/acqrel.diff && echo "acqrel applied"
timeout 150 python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_qkv_rope.py \
  -k "quantized" > "$OUT/acqrel_tests.log" 2>&1
echo "acqrel tests rc=$? $(tail -n 1 "$OUT/acqrel_tests.log") $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|E  )" "$OUT/acqrel_tests.log" | head -6
for i in 1 2; do for f in 1 0; do
  [ $(( $(date +%s) - t0 )) -gt 330 ] && break 2
  LSERVE_CUDA_FUSE_ROPE_QUANT=$f timeout 80 python3 tools/bench_e2e.py --sparse --sparse-contexts 65536 --sparse-modes sparse \
    --deadline 1 --sparse-decode-steps 24 --quantize int8 --kv-dtype int8 --out /tmp/acq_$f$i.json > /tmp/acq_$f$i.log 2>&1
  echo "acqrel fuse=$f rc=$? $(grep -E 'decode replay|overlapped' /tmp/acq_$f$i.log | tr -s ' ' | tr '\n' '|')"
done; done
git checkout kernels/rope_out.cuh
