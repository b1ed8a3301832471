# Settles whether main's engine steps lost host time against 76b70ae (2026-12-06), which one run pair of this
# session suggested (README here): the SmolLM2 bench at both commits, alternating twice on one machine, each run
# preceded by the machine's load and busiest processes (contention by a leftover process would explain the pair).
# Needs the GGUF assembled by .device/on-device.sh (carried in parts) and git history on the device.
# OUT=dir bash tools/results/gpu_2026-12-07d/ab_host.sh
set -u
. .device/on-device.sh >/dev/null 2>&1
[ -d /tmp/old ] || git worktree add -q /tmp/old 76b70ae
for round in 1 2; do
  for tree in "$PWD" /tmp/old; do
    name=$( [ "$tree" = "$PWD" ] && echo main || echo old )_$round
    { uptime; ps -eo pcpu,etimes,args --sort=-pcpu | head -5; } > "$OUT/$name.load"
    (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout 250 python3 tools/bench_e2e.py --gguf /tmp/smollm2.gguf \
      --skip llama --skip splits --skip smollm2-lserve --smol-prompts 512 --deadline 200 --out "$OUT/$name") \
      2>&1 | grep -E "engine|prefill" | sed "s/^/$name /"
  done
done
