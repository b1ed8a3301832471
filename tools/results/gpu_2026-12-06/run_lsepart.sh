# page_topk's logsumexp from page_score's per-CTA partials, and mass's scores staged by one coalesced pass: main
# at 2e8bbc8 (the tree in .device/base_tree.tar: `git archive HEAD lserve_lite kernels tools
# pyproject.toml ":(exclude)tools/results"`), then, when .device/part_tree.tar is carried (the same archive of
# 404785a, the first version), that one, against the working tree, the selector pair timed alternately
# (topk_profile.py time); then the tree's selector GPU tests, the LServe graph tests, the bench's selector rows,
# and the phases stamped.
# OUT=dir bash tools/results/gpu_2026-12-06/run_lsepart.sh  (carry .device/whl, .device/on-device.sh,
# .device/base_tree.tar, optionally .device/part_tree.tar)
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-06
end=$(($(date +%s) + 430))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > "$OUT/gpu.txt"
trees=main
rm -rf /tmp/t_main && mkdir -p /tmp/t_main && tar -xf .device/base_tree.tar -C /tmp/t_main
if [ -f .device/part_tree.tar ]; then
  trees="main part"; rm -rf /tmp/t_part && mkdir -p /tmp/t_part && tar -xf .device/part_tree.tar -C /tmp/t_part
fi
for r in 1 2; do
  for t in $trees; do
    (cd /tmp/t_$t && PYTHONPATH=/tmp/site:/tmp/t_$t timeout $(left 60) python3 $OLDPWD/$R/topk_profile.py time ${t}_$r "$OUT") >> "$OUT/pair.log" 2>&1
    echo "$t $r rc=$? $(date +%T)"
  done
  timeout $(left 60) python3 $R/topk_profile.py time new_$r "$OUT" >> "$OUT/pair.log" 2>&1
  echo "new $r rc=$? $(date +%T)"
done
python3 - "$OUT/topk_profile.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(f"{r['label']:8s} {r['ctx']:7d} L{r['layer']:<2d} {r['reduce']:4s} {r['pair_us']:7.2f} us")
PY
timeout $(left 170) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_sparse.py -k "page_selector and rawkernel" > "$OUT/pytest_sel.log" 2>&1
echo "pytest_sel rc=$? $(tail -n 1 "$OUT/pytest_sel.log") $(date +%T)"
timeout $(left 60) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_graphs_sparse.py > "$OUT/pytest_graphs.log" 2>&1
echo "pytest_graphs rc=$? $(tail -n 1 "$OUT/pytest_graphs.log") $(date +%T)"
timeout $(left 60) python3 tools/bench_sparse.py --selector-only --out "$OUT/bench_sel" > "$OUT/bench_sel.log" 2>&1
echo "bench_sel rc=$? $(date +%T)"; tail -n 5 "$OUT/bench_sel.log"
if [ $(( end - $(date +%s) )) -gt 50 ]; then
  rm -rf /tmp/tp && mkdir -p /tmp/tp && cp -r lserve_lite kernels tools pyproject.toml /tmp/tp/
  python3 $R/topk_profile.py patch /tmp/tp
  (cd /tmp/tp && PYTHONPATH=/tmp/site:/tmp/tp timeout $(left 50) python3 $OLDPWD/$R/topk_profile.py time stamped "$OUT") > "$OUT/stamped.log" 2>&1
  echo "stamped rc=$? $(date +%T)"; cat "$OUT/stamped.log"
fi
