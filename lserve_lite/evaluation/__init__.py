"""Calibration and evaluation, above the LLM API: synthetic long-context text, a step-by-step harness
over the engine's own runner, and `lserve-lite calibrate`."""
