# Main against OLD (default 76b70ae, 2026-12-06) on one machine, alternating ROUNDS times (default 2): the SmolLM2-shaped random model's bench rows
# (tools/bench_e2e.py --model-dir, dense, 512 context), each run preceded by the machine's load. Whatever of REM
# seconds is left; a run that does not fit is not started. Needs /tmp/smolrand (rand_smol.py), and the old tree
# carried as .device/old (`git archive OLD ...`) or git history for a worktree.
# OUT=dir REM=s [OLD=commit] [ROUNDS=n] bash tools/results/gpu_2026-12-07e/ab_host.sh
[ -d /tmp/old ] || { [ -d .device/old ] && cp -r .device/old /tmp/old; } || git worktree add -q /tmp/old ${OLD:-76b70ae}
t0=$(date +%s); last=${FIRST:-150}
for round in $(seq ${ROUNDS:-2}); do
  for tree in "$PWD" /tmp/old; do
    name=$( [ "$tree" = "$PWD" ] && echo main || echo old )_$round
    left=$(( REM - ($(date +%s) - t0) ))
    [ $left -lt $(( last + 10 )) ] && { echo "$name not run ($left s left)"; continue; }
    { uptime; ps -eo pcpu,etimes,args --sort=-pcpu | head -5; } > "$OUT/$name.load"
    s=$(date +%s)
    (cd "$tree" && PYTHONPATH=/tmp/site:$tree timeout $left python3 tools/bench_e2e.py --model-dir /tmp/smolrand \
      --skip llama --skip splits --skip smollm2-lserve --smol-prompts 512 --out "$OUT/$name") > "$OUT/$name.log" 2>&1
    grep -E "engine|prefill|replay" "$OUT/$name.log" | sed "s/^/$name /"
    grep -q "engine" "$OUT/$name.log" || tail -n 5 "$OUT/$name.log" | sed "s/^/$name /"  # why a run gave no rows
    last=$(( $(date +%s) - s )); echo "$name took $last s"
  done
done
