# Device call 4: per-step engine times and host profiles, dense vs LServe, SmolLM2-shaped int4, batch 1, 512.
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-05e
[ -d /tmp/smolr ] || python3 tools/results/gpu_2026-12-04h/6_make_random_smollm2.py weights/SmolLM2-135M-Instruct /tmp/smolr > /dev/null 2>&1
for m in lserve dense lserve; do
  timeout 120 python3 $R/step_times.py /tmp/smolr $m int4 512 >> "$OUT/8_step_times_$m.log" 2>&1; echo "$m rc=$?"
done
