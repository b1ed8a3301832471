# Calls 2 and 3 (warm machine): the whole `pytest -m gpu` but test_gpu_e2e (the default model's GGUF is not carried),
# one file a step and log, in the order FILES gives (default: every file), until TOTAL seconds; prints the files left.
# PREFETCH=1 applies prefetch.diff first. OUT=dir [FILES="test_gpu_x ..."] [TOTAL=s] bash tools/results/gpu_2026-12-06f/run2.sh
set -u
. .device/on-device.sh
nvidia-smi --query-gpu=name --format=csv,noheader
[ "${PREFETCH:-0}" = 1 ] && git apply tools/results/gpu_2026-12-06f/prefetch.diff && echo "prefetch applied"
t0=$(date +%s); left=""
for f in ${FILES:-$(cd tests && ls test_gpu_*.py | sed 's/\.py$//' | grep -v test_gpu_e2e)}; do
  rem=$(( ${TOTAL:-570} - ($(date +%s) - t0) ))
  [ $rem -lt 20 ] && { left="$left $f"; continue; }
  timeout $rem python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/$f.py > "$OUT/pytest_$f.log" 2>&1
  echo "$f rc=$? $(tail -n 1 "$OUT/pytest_$f.log") at $(( $(date +%s) - t0 )) s"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_$f.log" | head -6
done
echo "not run:${left:- none}"
git checkout kernels/
