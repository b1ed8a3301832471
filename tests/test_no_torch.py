"""The engine never imports torch: importing lserve_lite and generating (constrained too) leaves it out of
sys.modules."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
from lserve_lite import LLM, SamplingParams
llm = LLM(sys.argv[1], backend="cpu")
out = llm.generate(["hello world"], SamplingParams(temperature=0, max_new_tokens=5))
assert len(out[0].token_ids) >= 1
try:  # constrained decoding (llguidance) and logprobs stay torch-free too
    import llguidance  # noqa: F401
    llm.generate(["x"], SamplingParams(max_new_tokens=4, logprobs=2, response_format={"type": "json_object"}))
except ImportError:
    pass
print("torch" in sys.modules, "transformers" in sys.modules)
"""


def test_generate_without_torch(tiny_llama):
    r = subprocess.run(
        [sys.executable, "-c", CODE, str(tiny_llama)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
