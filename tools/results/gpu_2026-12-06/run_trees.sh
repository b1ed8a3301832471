# The page selector pair (topk_profile.py time: page_score + page_topk, CUDA Graph replays, bench layers 0 / 8, 128k
# and 256k, max and mass) of every tree carried as .device/trees/NAME.tar (made here with `git archive --format=tar
# REV lserve_lite kernels tools pyproject.toml ":(exclude)tools/results" > .device/trees/NAME.tar`) and of the
# working tree ("tree"), alternating twice; then the working tree's selector GPU tests, the LServe graph tests, and
# (time left) the working tree's page_topk phases stamped.
# OUT=dir bash tools/results/gpu_2026-12-06/run_trees.sh  (carry .device/whl, .device/on-device.sh, .device/trees)
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-06
end=$(($(date +%s) + ${DEADLINE:-420}))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > "$OUT/gpu.txt"
names=""
for t in .device/trees/*.tar; do
  n=$(basename "$t" .tar); names="$names $n"
  rm -rf /tmp/t_$n && mkdir -p /tmp/t_$n && tar -xf "$t" -C /tmp/t_$n
done
for r in 1 2; do
  for n in $names; do
    (cd /tmp/t_$n && PYTHONPATH=/tmp/site:/tmp/t_$n timeout $(left 45) python3 $OLDPWD/$R/topk_profile.py time ${n}_$r "$OUT") >> "$OUT/pair.log" 2>&1
    echo "$n $r rc=$? $(date +%T)"
  done
  timeout $(left 45) python3 $R/topk_profile.py time tree_$r "$OUT" >> "$OUT/pair.log" 2>&1
  echo "tree $r rc=$? $(date +%T)"
done
python3 - "$OUT/topk_profile.jsonl" <<'PY'
import json, sys
from collections import defaultdict
d = defaultdict(list)
for l in open(sys.argv[1]):
    r = json.loads(l)
    d[(r["ctx"], r["layer"], r["reduce"])].append(f"{r['label']} {r['pair_us']:.2f}")
for k, v in sorted(d.items()):
    print(k, " | ".join(v))
PY
timeout $(left 170) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_sparse.py -k "page_selector and rawkernel" > "$OUT/pytest_sel.log" 2>&1
echo "pytest_sel rc=$? $(tail -n 1 "$OUT/pytest_sel.log") $(date +%T)"
timeout $(left 60) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_graphs_sparse.py > "$OUT/pytest_graphs.log" 2>&1
echo "pytest_graphs rc=$? $(tail -n 1 "$OUT/pytest_graphs.log") $(date +%T)"
if [ $(( end - $(date +%s) )) -gt 50 ]; then  # the working tree's page_topk phases (clock64 stamps)
  rm -rf /tmp/tp && mkdir -p /tmp/tp && cp -r lserve_lite kernels tools pyproject.toml /tmp/tp/
  python3 $R/topk_profile.py patch /tmp/tp
  (cd /tmp/tp && PYTHONPATH=/tmp/site:/tmp/tp timeout $(left 50) python3 $OLDPWD/$R/topk_profile.py time stamped "$OUT") > "$OUT/stamped.log" 2>&1
  echo "stamped rc=$? $(date +%T)"; cat "$OUT/stamped.log"
fi
