# The session's last GPU call: the sampling harness (sound_rows' first GPU run), the overflow check's and the device
# RoPE tables' timings, then pytest -m gpu on what this session's merges touched, a file a step until TOTAL seconds.
# OUT=dir TOTAL=s bash tools/results/gpu_2026-12-07c/final.sh
L=/tmp/logs3; . tools/results/gpu_2026-12-06g/prelude.sh
R=tools/results/gpu_2026-12-07c
t0=$(date +%s)
timeout 200 python3 -m lserve_lite.cli kernels test sampling > $L/harness_sampling.log 2>&1
echo "harness sampling rc=$? $(tail -n 1 $L/harness_sampling.log)"
grep -E "sound_rows|FAIL" $L/harness_sampling.log | head -5
timeout 60 python3 $R/sound_time.py 2>&1 | tee $L/sound_time.log | tail -6
timeout 90 python3 $R/rope_time.py 2>&1 | tee $L/rope_time.log | tail -2
timeout 150 python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_ops.py \
  -k "rope_tables or forward_matches" > $L/test_gpu_ops_rope.log 2>&1
echo "test_gpu_ops -k rope_tables/forward rc=$? $(tail -n 1 $L/test_gpu_ops_rope.log)"
for f in test_overflowing_weights ${FILES:-test_gpu_overlap test_gpu_api test_gpu_graphs_sparse}; do
  rem=$(( ${TOTAL:-500} - ($(date +%s) - t0) )); [ $rem -lt 20 ] && { echo "not run: $f"; continue; }
  timeout $rem python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/$f.py > $L/$f.log 2>&1
  echo "$f rc=$? $(tail -n 1 $L/$f.log) at $(( $(date +%s) - t0 )) s"
  grep -E "^(FAILED|ERROR)" $L/$f.log | head -6
done
