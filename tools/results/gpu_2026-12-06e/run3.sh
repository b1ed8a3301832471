# Call 3 (same warm machine; carries the model's second part: the SmolLM2 GGUF is assembled here): the end-to-end
# GPU tests, then SmolLM2 decode tokens/s (issue 12's figure).
# OUT=dir bash tools/results/gpu_2026-12-06e/run3.sh
set -u
. .device/on-device.sh
nvidia-smi --query-gpu=name --format=csv,noheader
[ -f /tmp/smollm2.gguf ] || { echo "no model"; exit 0; }
export LSERVE_SMOLLM2_GGUF=/tmp/smollm2.gguf
timeout 170 python3 -m pytest -p no:cacheprovider -m gpu -q -rf --tb=short tests/test_gpu_e2e.py > "$OUT/e2e_tests.log" 2>&1
echo "e2e tests rc=$? $(tail -n 1 "$OUT/e2e_tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/e2e_tests.log" | head -8
timeout 150 python3 tools/bench_e2e.py --gguf /tmp/smollm2.gguf --skip llama --skip smollm2-lserve \
  --out "$OUT/smol.json" > "$OUT/smol.log" 2>&1
echo "smol rc=$?"; grep -iE "tok|decode" "$OUT/smol.log" | head -12
