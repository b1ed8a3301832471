# The session's first device call (README here): the GPU test files the previous session ran without the carried
# wheels (test_gpu_quant needs gguf, test_gpu_sparse's Numba selector the wheels' numpy), then the others touched
# by its changes, while TOTAL seconds last. OUT=dir [TOTAL=s] bash .../call_a.sh
# (carry .device/whl, .device/smolcfg and .device/on-device.sh)
L=/tmp/logs_a; . tools/results/gpu_2026-12-06g/prelude.sh
python3 -c "import numpy, gguf; print('numpy', numpy.__version__, 'gguf', gguf.__file__)"
t0=$(date +%s)
step() {  # a GPU test file, if TOTAL leaves room
  rem=$(( ${TOTAL:-570} - ($(date +%s) - t0) ))
  [ $rem -lt 30 ] && { echo "not run: $1"; return; }
  timeout $rem python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/$1.py > $L/$1.log 2>&1
  echo "$1 rc=$? $(tail -n 1 $L/$1.log) at $(( $(date +%s) - t0 )) s"
  grep -E "^(FAILED|ERROR)" $L/$1.log | head -6
}
for f in ${FILES:-test_gpu_quant test_gpu_sparse test_gpu_overlap test_gpu_graphs_sparse}; do step $f; done
