# Warm-machine calls: `pytest -m gpu` a file a step and log (default: every file but test_gpu_e2e, which needs the
# SmolLM2 GGUF carried in parts), in the order FILES gives, until TOTAL seconds; prints the files left. PREFETCH=1
# applies decode_prefetch.diff first (its knob unset: off). Logs: $OUT/logs2.tgz.
# OUT=dir [FILES="test_gpu_x ..."] [TOTAL=s] [PREFETCH=1] bash tools/results/gpu_2026-12-06g/run2.sh
L=/tmp/logs2; . tools/results/gpu_2026-12-06g/prelude.sh
t0=$(date +%s); left=""
for f in ${FILES:-$(cd tests && ls test_gpu_*.py | sed 's/\.py$//' | grep -v test_gpu_e2e)}; do
  rem=$(( ${TOTAL:-570} - ($(date +%s) - t0) ))
  [ $rem -lt 20 ] && { left="$left $f"; continue; }
  timeout $rem python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/$f.py > $L/$f.log 2>&1
  echo "$f rc=$? $(tail -n 1 $L/$f.log) at $(( $(date +%s) - t0 )) s"
  grep -E "^(FAILED|ERROR)" $L/$f.log | head -6
done
echo "not run:${left:- none}"
