# Call 2 (warm machine): decode_prefetch.diff applied (branch decode-prefetch: LSERVE_DECODE_PREFETCH=N, the decode
# attention's L2 prefetch before the PDL wait): the decode tests with N=16, then LServe 64k (Llama-3-8B shape, int8
# weights, int8 / fp16 KV) with N 0 / 16 alternating. Logs: $OUT/logs2.tgz.
# OUT=dir [TOTAL=s] bash tools/results/gpu_2026-12-07/call2.sh
L=/tmp/logs2; PREFETCH=1; . tools/results/gpu_2026-12-06g/prelude.sh
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
timeout 240 env LSERVE_DECODE_PREFETCH=16 python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short \
  tests/test_gpu_attention.py tests/test_gpu_graphs_sparse.py tests/test_gpu_sparse.py -k "decode or engine or graph" \
  > $L/pf_tests.log 2>&1
echo "prefetch tests rc=$? $(tail -n 1 $L/pf_tests.log) $(el) s"; grep -E "^(FAILED|ERROR)" $L/pf_tests.log | head -8
ab() {  # label, kv, prefetch
  [ $(el) -gt $(( ${TOTAL:-560} - 45 )) ] && { echo "no time for $1"; return; }
  timeout 80 env LSERVE_DECODE_PREFETCH=$3 python3 tools/bench_e2e.py --sparse --sparse-contexts 65536 --sparse-modes sparse \
    --deadline 1 --sparse-decode-steps 24 --quantize int8 --kv-dtype $2 --out "$L/e2e_$1.json" > $L/e2e_$1.log 2>&1
  echo "$1 rc=$? $(el) s $(grep -E "decode replay" $L/e2e_$1.log | cut -c50-110) | $(grep -E "overlapped" $L/e2e_$1.log | cut -c50-110)"
  grep -E "Error" $L/e2e_$1.log | head -3; rm -f $L/e2e_$1.png
}
for i in 1 2 3; do
  ab pf16_i8_$i int8 16; ab pf0_i8_$i int8 0; ab pf0_f16_$i fp16 0; ab pf16_f16_$i fp16 16
done
