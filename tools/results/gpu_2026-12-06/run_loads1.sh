# Branch topk-loads1 (page_topk's logsumexp loads batched, without the early plan reads): the RawKernel selector's
# GPU tests, the LServe graph tests, then the bench's selector and decode rows with SDPA in the same run.
# OUT=dir bash tools/results/gpu_2026-12-06/run_loads1.sh  (repository root; carry .device/whl, .device/on-device.sh)
set -u
. .device/on-device.sh
end=$(($(date +%s) + 420))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > "$OUT/gpu.txt"
timeout $(left 240) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_sparse.py -k "page_selector and rawkernel" > "$OUT/pytest_sel.log" 2>&1
echo "pytest_sel rc=$? $(tail -n 1 "$OUT/pytest_sel.log") $(date +%T)"
timeout $(left 70) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_graphs_sparse.py > "$OUT/pytest_graphs.log" 2>&1
echo "pytest_graphs rc=$? $(tail -n 1 "$OUT/pytest_graphs.log") $(date +%T)"
timeout $(left 400) python3 tools/bench_sparse.py --no-prefill --no-flex --quick --out "$OUT/bench_sparse.json" > "$OUT/bench_sparse.log" 2>&1
echo "bench_sparse rc=$? $(date +%T)"; tail -n 30 "$OUT/bench_sparse.log"
