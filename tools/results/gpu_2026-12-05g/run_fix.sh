# Branch topk-loads, three page selectors timed on one machine (topk_profile.py time: the pair per bench layer, max
# and mass), alternating twice: main's (page_select_main.cu.txt), "loads" (page_topk's logsumexp loads batched:
# head_lse / fill issue a chunk's loads before its merges, lse_merge branch-free, fill two heads a round;
# page_select_loads.cu.txt) and the tree's ("loads" plus both kernels reading the plan before the PDL wait); then
# the RawKernel selector's GPU tests and the LServe graph tests on the tree's kernel.
# OUT=dir bash tools/results/gpu_2026-12-05g/run_fix.sh  (repository root; carry .device/whl, .device/on-device.sh)
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-05g
end=$(($(date +%s) + 400))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > "$OUT/gpu.txt"
for t in main loads; do
  rm -rf /tmp/t_$t && mkdir -p /tmp/t_$t && cp -r lserve_lite kernels tools pyproject.toml /tmp/t_$t/
  cp $R/page_select_$t.cu.txt /tmp/t_$t/kernels/page_select.cu
done
for r in 1 2; do
  for t in main loads; do
    (cd /tmp/t_$t && PYTHONPATH=/tmp/site:/tmp/t_$t timeout $(left 60) python3 $OLDPWD/$R/topk_profile.py time ${t}_$r "$OUT") >> "$OUT/topk_fix.log" 2>&1
    echo "$t $r rc=$? $(date +%T)"
  done
  timeout $(left 60) python3 $R/topk_profile.py time plan_$r "$OUT" >> "$OUT/topk_fix.log" 2>&1
  echo "plan $r rc=$? $(date +%T)"
done
python3 - "$OUT/topk_profile.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(f"{r['label']:8s} {r['ctx']:7d} L{r['layer']:<2d} {r['reduce']:4s} {r['pair_us']:7.2f} us")
PY
timeout $(left 150) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_sparse.py -k "page_selector and rawkernel" > "$OUT/pytest_sel_fix.log" 2>&1
echo "pytest_sel rc=$? $(tail -n 1 "$OUT/pytest_sel_fix.log")"
timeout $(left 60) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_graphs_sparse.py > "$OUT/pytest_graphs_fix.log" 2>&1
echo "pytest_graphs rc=$? $(tail -n 1 "$OUT/pytest_graphs_fix.log")"
if [ $(( end - $(date +%s) )) -gt 60 ]; then  # the tree's page_topk phases (clock64 stamps), as run.sh did for main's
  rm -rf /tmp/tp && mkdir -p /tmp/tp && cp -r lserve_lite kernels tools pyproject.toml /tmp/tp/
  python3 $R/topk_profile.py patch /tmp/tp
  (cd /tmp/tp && PYTHONPATH=/tmp/site:/tmp/tp timeout $(left 60) python3 $OLDPWD/$R/topk_profile.py time stamped_plan "$OUT") > "$OUT/topk_stamped_fix.log" 2>&1
  echo "stamped rc=$? $(date +%T)"; cat "$OUT/topk_stamped_fix.log"
fi
