# Call 1 (fresh machine): the kernel harness's sampling case first (its `sample (min_p)` row has never run on a GPU),
# then kv_quant and page_select, then the GPU test files not run since the K/V quantization's NaN fix. Logs: $OUT/logs1.tgz.
# OUT=dir [TOTAL=s] bash tools/results/gpu_2026-12-07b/call1.sh
L=/tmp/logs1; . tools/results/gpu_2026-12-06g/prelude.sh
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
timeout 300 python3 -m lserve_lite.cli kernels test --json $L/kernels.json sampling kv_quant page_select > $L/kernels.log 2>&1
echo "kernels rc=$? $(tail -n 2 $L/kernels.log | tr '\n' ' ') $(el) s"; grep -E "FAIL|min_p" $L/kernels.log | head -8
cp $L/kernels.json "$OUT/" 2>/dev/null
for f in test_gpu_kv_quant test_gpu_qkv_rope test_gpu_api; do
  rem=$(( ${TOTAL:-570} - $(el) )); [ $rem -lt 20 ] && { echo "not run: $f"; continue; }
  timeout $rem python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/$f.py > $L/$f.log 2>&1
  echo "$f rc=$? $(tail -n 1 $L/$f.log) $(el) s"; grep -E "^(FAILED|ERROR)" $L/$f.log | head -6
done
rem=$(( ${TOTAL:-570} - $(el) ))
[ $rem -gt 40 ] && timeout $rem python3 tools/results/gpu_2026-12-07b/splits.py $OUT/splits.json > $L/splits.log 2>&1
echo "splits rc=$? $(el) s"; cat $L/splits.log | cut -c1-300 | tail -12
