# (A copy of the ps-pipeline branch's run2.sh.) The int4 pair of the previous session's change (LServe rows within their budget select nothing), which timed out
# there: SmolLM2-shaped random model, int4 weights, LServe, batch 1, 512 context, new / old alternating (old = the
# tree with tools/results/gpu_2026-12-05e/model_runner_before.py.txt swapped in).  OUT=dir bash run2.sh
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-05e
[ -d /tmp/smolr ] || python3 tools/results/gpu_2026-12-04h/6_make_random_smollm2.py weights/SmolLM2-135M-Instruct /tmp/smolr > /dev/null 2>&1
rm -rf /tmp/old && mkdir -p /tmp/old && cp -r lserve_lite kernels /tmp/old/ && cp $R/model_runner_before.py.txt /tmp/old/lserve_lite/engine/model_runner.py
for i in 1 2; do
  timeout 150 python3 $R/ab_steps.py /tmp/smolr new lserve int4 512 >> "$OUT/ab_no_selection_int4.log" 2>&1; echo "new rc=$?"
  PYTHONPATH=/tmp/site:/tmp/old timeout 150 python3 $R/ab_steps.py /tmp/smolr old lserve int4 512 >> "$OUT/ab_no_selection_int4.log" 2>&1; echo "old rc=$?"
done
