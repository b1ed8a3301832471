# For the next GPU session: the page selector and LServe decode at sub_pages 2 against 4 (half the statistics
# page_score reads; the CPU measured the same attention mass within 0.005 at 8k, README in cpu_2026-12-06/), each
# setting twice, alternating, then the decode rows once each (SDPA in the same run), then LServe end to end at 256k
# (each step bounded by what is left of DEADLINE; the e2e pair may need a second call: DEADLINE=560 and the others cut)
# OUT=dir bash tools/results/gpu_2026-12-06/run_sub2.sh  (carry .device/whl, .device/on-device.sh)
set -u
. .device/on-device.sh
end=$(($(date +%s) + ${DEADLINE:-540}))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > "$OUT/gpu.txt"
for r in 1 2; do
  for s in 4 2; do
    mkdir -p "$OUT/sel_s${s}_$r"
    timeout $(left 90) python3 tools/bench_sparse.py --selector-only --sub-pages $s --out "$OUT/sel_s${s}_$r" \
      > "$OUT/sel_s${s}_$r.log" 2>&1
    echo "sel sub $s run $r rc=$? $(grep -E '^\| (128k|256k)' "$OUT/sel_s${s}_$r.log" | tr '\n' ' ') $(date +%T)"
  done
done
for s in 4 2; do
  mkdir -p "$OUT/dec_s$s"
  timeout $(left 150) python3 tools/bench_sparse.py --no-prefill --no-flex --quick --sub-pages $s --out "$OUT/dec_s$s" \
    > "$OUT/dec_s$s.log" 2>&1
  echo "decode sub $s rc=$? $(date +%T)"; tail -n 6 "$OUT/dec_s$s.log"
done
# LServe end to end at 256k (random K/V, int8 weights as in docs/PERF_e2e.md's 2026-12-04 run), sub_pages 4 then 2
for s in 4 2; do
  timeout $(left 200) python3 tools/bench_e2e.py --sparse --sparse-contexts 262144 --sparse-modes sparse --quantize int8 \
    --sparse-sub-pages $s --deadline $(( $(date +%s) + $(left 180) )) --out "$OUT/e2e_s$s.json" > "$OUT/e2e_s$s.log" 2>&1
  echo "e2e sub $s rc=$? $(date +%T)"; tail -n 4 "$OUT/e2e_s$s.log"
done
