# run1.sh within one 600 s device call: the same steps, each step's limit cut to the time left before a deadline
# (550 s from the start), the second alternation only if time remains; then the forward-vs-CPU GPU test (llama and
# qwen2).  OUT=dir bash tools/results/gpu_2026-12-05f/run1b.sh  (from the repository root)
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-05f
end=$(($(date +%s) + 550))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > "$OUT/gpu.txt"
for t in old new3 new2; do mkdir -p /tmp/t_$t && cp -r lserve_lite kernels tools tests pyproject.toml /tmp/t_$t/; done
cp $R/page_select_main.cu.txt /tmp/t_old/kernels/page_select.cu
sed -i 's/__launch_bounds__(lsattn::PS_THREADS, 3)/__launch_bounds__(lsattn::PS_THREADS, 2)/' /tmp/t_new2/kernels/page_select.cu
sed -i 's/^_SELECT_CTAS_PER_SM = 3 /_SELECT_CTAS_PER_SM = 2 /' /tmp/t_new2/lserve_lite/backends/cuda_attention.py
grep -c "PS_THREADS, 2)" /tmp/t_new2/kernels/page_select.cu; grep "^_SELECT_CTAS_PER_SM" /tmp/t_new2/lserve_lite/backends/cuda_attention.py
timeout $(left 150) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_sparse.py -k page_selector > "$OUT/pytest_sel.log" 2>&1
echo "pytest_sel rc=$? $(tail -n 1 "$OUT/pytest_sel.log") $(date +%T)"
for r in 1 2; do for t in old new3 new2; do
  [ $(( end - $(date +%s) )) -lt 200 ] && break 2
  (cd /tmp/t_$t && PYTHONPATH=/tmp/site:/tmp/t_$t timeout 90 python3 "$OLDPWD/$R/selector_parts.py" ${t}_$r "$OUT") >> "$OUT/parts.log" 2>&1
  echo "$t $r rc=$? $(date +%T)"
done; done
timeout $(left 100) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_graphs_sparse.py > "$OUT/pytest_graphs.log" 2>&1
echo "pytest_graphs rc=$? $(tail -n 1 "$OUT/pytest_graphs.log")"
timeout $(left 100) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu_ops.py -k forward > "$OUT/pytest_fwd.log" 2>&1
echo "pytest_fwd rc=$? $(tail -n 1 "$OUT/pytest_fwd.log")"
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/parts.jsonl")]
for r in rows:
    print(r["label"], r["ctx"], r["layer"], r["dense"], r["gx"], *(f"{k}={r[k]:.2f}" for k in r if k.endswith("_us")))
PY
