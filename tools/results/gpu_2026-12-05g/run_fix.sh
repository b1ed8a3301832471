# page_topk's logsumexp loads batched: A (head_lse / fill: a chunk's loads before its merges; lse_merge branch-free,
# page_select_A.cu.txt) and B (the tree's kernel: A with fill taking two heads a round). The pair's time for A and B
# and B's stamped phases (topk_profile.py), then the RawKernel selector's GPU tests and the LServe graph tests on B.
# OUT=dir bash tools/results/gpu_2026-12-05g/run_fix.sh  (repository root)
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-05g
end=$(($(date +%s) + 260))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > "$OUT/gpu.txt"
for t in tp ta; do rm -rf /tmp/$t && mkdir -p /tmp/$t && cp -r lserve_lite kernels tools pyproject.toml /tmp/$t/; done
cp $R/page_select_A.cu.txt /tmp/ta/kernels/page_select.cu
python3 $R/topk_profile.py patch /tmp/tp
(cd /tmp/ta && PYTHONPATH=/tmp/site:/tmp/ta timeout $(left 100) python3 $OLDPWD/$R/topk_profile.py time plain_A "$OUT") > "$OUT/topk_profile_fix.log" 2>&1
echo "A rc=$? $(date +%T)"
timeout $(left 100) python3 $R/topk_profile.py time plain_B "$OUT" >> "$OUT/topk_profile_fix.log" 2>&1
echo "B rc=$? $(date +%T)"
(cd /tmp/tp && PYTHONPATH=/tmp/site:/tmp/tp timeout $(left 100) python3 $OLDPWD/$R/topk_profile.py time stamped_B "$OUT") >> "$OUT/topk_profile_fix.log" 2>&1
echo "stamped rc=$? $(date +%T)"
cat "$OUT/topk_profile_fix.log"
timeout $(left 110) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_sparse.py -k "page_selector and rawkernel" > "$OUT/pytest_sel_fix.log" 2>&1
echo "pytest_sel rc=$? $(tail -n 1 "$OUT/pytest_sel_fix.log")"
timeout $(left 60) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_graphs_sparse.py > "$OUT/pytest_graphs_fix.log" 2>&1
echo "pytest_graphs rc=$? $(tail -n 1 "$OUT/pytest_graphs_fix.log")"
