# LServe and dense decode at 256k, Llama-3-8B shape, int8 weights, fp16 / int8 KV (issue 11's "LServe with int8 KV no
# slower" and "dense >= 1.6x"); then fp16 weights if time is left. Then SmolLM2 (the GGUF, when assembled) with
# LSERVE_DECODE_PREFETCH unset / 16 if PREFETCH=1. Logs: $OUT/logs3.tgz.
# OUT=dir [TOTAL=s] [PREFETCH=1] bash tools/results/gpu_2026-12-06g/run3.sh
L=/tmp/logs3; . tools/results/gpu_2026-12-06g/prelude.sh
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
smol() {  # label, prefetch
  [ -f /tmp/smollm2.gguf ] || { echo "no GGUF for $1"; return; }
  [ $(el) -gt $(( ${TOTAL:-560} - 70 )) ] && { echo "no time for $1"; return; }
  timeout 120 env LSERVE_DECODE_PREFETCH=$2 LSERVE_SMOLLM2_GGUF=/tmp/smollm2.gguf python3 tools/bench_e2e.py --skip llama \
    --skip splits --skip smollm2-lserve --out "$L/$1.json" > $L/$1.log 2>&1
  echo "$1 rc=$? $(el) s"; grep -E "tokens/s|replay" $L/$1.log | cut -c1-130 | head -6; rm -f $L/$1.png
}
run() {  # label, then bench_e2e arguments
  local l=$1; shift
  [ $(el) -gt $(( ${TOTAL:-560} - 90 )) ] && { echo "no time for $l"; return; }
  timeout 150 python3 tools/bench_e2e.py --sparse --sparse-contexts 262144 --deadline 1 --sparse-decode-steps 24 "$@" \
    --out "$L/$l.json" > $L/$l.log 2>&1
  echo "$l rc=$? $(el) s"; grep -E "decode replay|overlapped" $L/$l.log | cut -c1-120; grep -E "Error" $L/$l.log | head -3
  rm -f $L/$l.png
}
[ "${SMOL:-1}" = 1 ] && for i in 1 2; do smol smol_pf0_$i 0; [ "${PREFETCH:-0}" = 1 ] && smol smol_pf16_$i 16; done
run i8w_f16kv --sparse-modes sparse dense --quantize int8 --kv-dtype fp16
run i8w_i8kv --sparse-modes sparse dense --quantize int8 --kv-dtype int8
run f16w_f16kv --sparse-modes sparse dense --kv-dtype fp16
run f16w_i8kv --sparse-modes sparse dense --kv-dtype int8
