# Device call 7: LServe rows within their budget select nothing (ModelRunner._sparse_layout): A/B against the tree
# before (model_runner_before.py.txt swapped into a copy), SmolLM2-shaped int4, LServe, batch 1, alternating; then the
# engine-level GPU tests.
set -u
. .device/on-device.sh
R=tools/results/gpu_2026-12-05e
[ -d /tmp/smolr ] || python3 tools/results/gpu_2026-12-04h/6_make_random_smollm2.py weights/SmolLM2-135M-Instruct /tmp/smolr > /dev/null 2>&1
rm -rf /tmp/old && mkdir -p /tmp/old && cp -r lserve_lite kernels /tmp/old/ && cp $R/model_runner_before.py.txt /tmp/old/lserve_lite/engine/model_runner.py
for i in 1 2; do
  timeout 60 python3 $R/ab_steps.py /tmp/smolr new lserve int4 512 >> "$OUT/12_ab_no_selection.log" 2>&1; echo "new rc=$?"
  PYTHONPATH=/tmp/site:/tmp/old timeout 60 python3 $R/ab_steps.py /tmp/smolr old lserve int4 512 >> "$OUT/12_ab_no_selection.log" 2>&1; echo "old rc=$?"
done
OUT=$OUT bash tools/gpu_check.sh engine
