# The last ~4 minutes of the session's device time: the working tree's selector (one-exponential merge, head_lse
# over every warp) against 404785a's (.device/part_tree.tar) and main's (.device/base_tree.tar), one round each,
# then the tree's selector GPU tests and the LServe graph tests, within about 185 s.
# OUT=dir bash tools/results/gpu_2026-12-06/run_short.sh  (carry .device/whl, .device/on-device.sh, both tars)
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-06
end=$(($(date +%s) + 185))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > "$OUT/gpu.txt"
for t in part main; do rm -rf /tmp/t_$t && mkdir -p /tmp/t_$t && tar -xf .device/${t/main/base}_tree.tar -C /tmp/t_$t; done
(cd /tmp/t_part && PYTHONPATH=/tmp/site:/tmp/t_part timeout $(left 40) python3 $OLDPWD/$R/topk_profile.py time part_1 "$OUT") >> "$OUT/pair.log" 2>&1
echo "part rc=$? $(date +%T)"
timeout $(left 40) python3 $R/topk_profile.py time new_1 "$OUT" >> "$OUT/pair.log" 2>&1
echo "new rc=$? $(date +%T)"
timeout $(left 110) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_sparse.py -k "page_selector and rawkernel" > "$OUT/pytest_sel.log" 2>&1
echo "pytest_sel rc=$? $(tail -n 1 "$OUT/pytest_sel.log") $(date +%T)"
(cd /tmp/t_main && PYTHONPATH=/tmp/site:/tmp/t_main timeout $(left 30) python3 $OLDPWD/$R/topk_profile.py time main_1 "$OUT") >> "$OUT/pair.log" 2>&1
echo "main rc=$? $(date +%T)"
timeout $(left 40) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_graphs_sparse.py > "$OUT/pytest_graphs.log" 2>&1
echo "pytest_graphs rc=$? $(tail -n 1 "$OUT/pytest_graphs.log") $(date +%T)"
python3 - "$OUT/topk_profile.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print(f"{r['label']:8s} {r['ctx']:7d} L{r['layer']:<2d} {r['reduce']:4s} {r['pair_us']:7.2f} us")
PY
