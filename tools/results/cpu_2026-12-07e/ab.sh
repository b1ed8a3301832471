#!/bin/bash
# Alternating A/B of the CPU bench: OLD_TREE (76b70ae) then NEW_TREE (main), rounds FIRST..N, each tree's
# lserve_lite run by the same driver (BENCH: 76b70ae's tools/bench_cpu.py, `--kv-dtypes auto`: the Q4_1 GGUF only),
# with `uptime` before and after each run. LSERVE_LITE_HOME: the folder holding the GGUF.
: "${OLD_TREE:?}" "${NEW_TREE:?}" "${BENCH:?}" "${OUT:?}"
for r in $(seq "${FIRST:-1}" "${N:-4}"); do
  for side in old new; do
    tree=$NEW_TREE; [ $side = old ] && tree=$OLD_TREE
    d=$OUT/${side}_$r; mkdir -p "$d"
    { date -u +%H:%M:%S; uptime; } > "$d/load_before.txt"
    (cd "$tree" && PYTHONPATH=$tree python3 "$BENCH" --kv-dtypes auto --out "$d" > "$d/stdout.txt" 2>&1)
    { date -u +%H:%M:%S; uptime; } > "$d/load_after.txt"
  done
done
