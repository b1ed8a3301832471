# page_topk's logsumexp loads batched (the tree's kernel: head_lse / fill issue a chunk's loads before its merges,
# lse_merge branch-free, fill two heads a round) against main's (page_select_main.cu.txt): the pair's time per bench
# layer (topk_profile.py time), then the RawKernel selector's GPU tests and the LServe graph tests on the new kernel.
# OUT=dir bash tools/results/gpu_2026-12-05g/run_fix.sh  (repository root)
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-05g
end=$(($(date +%s) + 185))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > "$OUT/gpu.txt"
rm -rf /tmp/tm && mkdir -p /tmp/tm && cp -r lserve_lite kernels tools pyproject.toml /tmp/tm/
cp $R/page_select_main.cu.txt /tmp/tm/kernels/page_select.cu
(cd /tmp/tm && PYTHONPATH=/tmp/site:/tmp/tm timeout $(left 60) python3 $OLDPWD/$R/topk_profile.py time main "$OUT") > "$OUT/topk_fix.log" 2>&1
echo "main rc=$? $(date +%T)"
timeout $(left 60) python3 $R/topk_profile.py time new "$OUT" >> "$OUT/topk_fix.log" 2>&1
echo "new rc=$? $(date +%T)"
cat "$OUT/topk_fix.log"
timeout $(left 90) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_sparse.py -k "page_selector and rawkernel" > "$OUT/pytest_sel_fix.log" 2>&1
echo "pytest_sel rc=$? $(tail -n 1 "$OUT/pytest_sel_fix.log")"
timeout $(left 40) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_graphs_sparse.py > "$OUT/pytest_graphs_fix.log" 2>&1
echo "pytest_graphs rc=$? $(tail -n 1 "$OUT/pytest_graphs_fix.log")"
