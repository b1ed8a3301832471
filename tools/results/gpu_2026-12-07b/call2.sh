# Warm-machine call: short_graphs.diff applied, then `pytest -m gpu` a file a step with LSERVE_DECODE_SHORT_TOKENS=$SHORT
# (default 4096: the engine's decode steps at test lengths replay the one-CTA graphs), in the order FILES gives, until
# TOTAL seconds. Logs: $OUT/logs2.tgz.
# OUT=dir [SHORT=n] [FILES="test_gpu_x ..."] [TOTAL=s] bash tools/results/gpu_2026-12-07b/call2.sh
L=/tmp/logs2; . tools/results/gpu_2026-12-06g/prelude.sh
git apply tools/results/gpu_2026-12-07b/short_graphs.diff && echo "short_graphs applied" || { echo "short_graphs NOT applied"; exit 1; }
export LSERVE_DECODE_SHORT_TOKENS=${SHORT:-4096}
t0=$(date +%s); left=""
for f in ${FILES:-test_gpu_overlap test_gpu_api test_gpu_qkv_rope test_gpu_kv_quant test_gpu_graphs_sparse}; do
  rem=$(( ${TOTAL:-570} - ($(date +%s) - t0) ))
  [ $rem -lt 20 ] && { left="$left $f"; continue; }
  timeout $rem python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/$f.py > $L/$f.log 2>&1
  echo "$f rc=$? $(tail -n 1 $L/$f.log) at $(( $(date +%s) - t0 )) s"
  grep -E "^(FAILED|ERROR)" $L/$f.log | head -6
done
echo "not run:${left:- none}"
