# Call 1 (fresh machine): short_graphs.diff applied: the graph tests of test_gpu_ops.py (a short-graph case among them)
# and short_ab.py (one-CTA graphs vs split + combine, random SmolLM2 / Llama-3-8B shapes); then the kernel
# harness's sampling case (its `sample (min_p)` row has never run on a GPU) and
# splits.py (decode attention at fixed split counts), as time allows. Logs: $OUT/logs1.tgz.
# OUT=dir [TOTAL=s] bash tools/results/gpu_2026-12-07b/call1.sh
L=/tmp/logs1; . tools/results/gpu_2026-12-06g/prelude.sh
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
git apply tools/results/gpu_2026-12-07b/short_graphs.diff && echo "short_graphs applied" || { echo "short_graphs NOT applied"; exit 1; }
timeout 150 python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_ops.py -k graphs > $L/short_ops.log 2>&1
echo "test_gpu_ops -k graphs rc=$? $(tail -n 1 $L/short_ops.log) $(el) s"; grep -E "^(FAILED|ERROR)" $L/short_ops.log | head -6
timeout 150 python3 tools/results/gpu_2026-12-07b/short_ab.py $OUT/short_ab.json > $L/short_ab.log 2>&1
echo "short_ab rc=$? $(el) s"; cut -c1-260 $L/short_ab.log | tail -10
rem=$(( ${TOTAL:-570} - $(el) - 5 ))
[ $rem -gt 30 ] && timeout $rem python3 -m lserve_lite.cli kernels test --json $L/kernels.json sampling > $L/kernels.log 2>&1
echo "kernels rc=$? $(tail -n 2 $L/kernels.log | tr '\n' ' ') $(el) s"; grep -E "FAIL|min_p" $L/kernels.log | head -8
cp $L/kernels.json "$OUT/" 2>/dev/null
[ $(( ${TOTAL:-570} - $(el) )) -gt 50 ] && timeout 60 python3 tools/results/gpu_2026-12-07b/splits.py $OUT/splits.json > $L/splits.log 2>&1; echo "splits rc=$? $(el) s"; cut -c1-260 $L/splits.log | tail -12
