# Device call 6: run5's A/B again (ab_steps.py read a counter the revert had removed).
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-05e
[ -d /tmp/smolr ] || python3 tools/results/gpu_2026-12-04h/6_make_random_smollm2.py weights/SmolLM2-135M-Instruct /tmp/smolr > /dev/null 2>&1
for i in 1 2; do for k in 2048 0; do
  LSERVE_SPLIT_NORM_MAX_K=$k timeout 60 python3 $R/ab_steps.py /tmp/smolr nk$k dense int4 512 4096 \
    >> "$OUT/10_ab_split_norm.log" 2>&1; echo "nk$k rc=$?"
done; done
for k in 2048 0; do
  LSERVE_SPLIT_NORM_MAX_K=$k timeout 60 python3 $R/ab_steps.py /tmp/smolr nk$k lserve int4 512 \
    >> "$OUT/10_ab_split_norm.log" 2>&1; echo "lserve nk$k rc=$?"
done
