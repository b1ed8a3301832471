# page_topk's phases, max vs mass (topk_profile.py: a stamped copy of the kernel in /tmp/tp, then the unchanged
# kernel's pair timed), then the int4 pair of ab_int4.sh (the seventh session's within-budget change) if time is left.
# OUT=dir bash tools/results/gpu_2026-12-05g/run.sh  (repository root; carry .device/whl, .device/on-device.sh and the
# SmolLM2 config / tokenizer files under weights/SmolLM2-135M-Instruct/ for the int4 pair)
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-05g
end=$(($(date +%s) + 560))
left() { local l=$(( end - $(date +%s) )); [ $l -gt $1 ] && echo $1 || echo $(( l > 5 ? l : 5 )); }
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv > "$OUT/gpu.txt"
rm -rf /tmp/tp && mkdir -p /tmp/tp && cp -r lserve_lite kernels tools pyproject.toml /tmp/tp/
python3 $R/topk_profile.py patch /tmp/tp
(cd /tmp/tp && PYTHONPATH=/tmp/site:/tmp/tp timeout $(left 150) python3 $OLDPWD/$R/topk_profile.py time stamped "$OUT") > "$OUT/topk_profile.log" 2>&1
echo "stamped rc=$? $(date +%T)"
timeout $(left 120) python3 $R/topk_profile.py time plain "$OUT" >> "$OUT/topk_profile.log" 2>&1
echo "plain rc=$? $(date +%T)"
cat "$OUT/topk_profile.log"
if [ $(( end - $(date +%s) )) -gt 200 ]; then OUT=$OUT timeout $(left 320) bash $R/ab_int4.sh; fi
grep -h "ctx" "$OUT/ab_no_selection_int4.log" 2>/dev/null | tail -n 12
