"""Static sparsity: DuoAttention head gates (`full_attention_heads.tsv`) and the streaming-head choice.

A pattern file holds one gate per (layer, KV head): tab-separated, one row per layer, one column per KV
head, higher = keep full attention. With static sparsity `s`, the round(s * layers * kv_heads) heads with
the lowest gates become streaming heads (class 1), ranked globally over all layers.
Shipped patterns live in the data folder `sparse/patterns/<model>/full_attention_heads.tsv`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..config import path_name, read_json_object, read_text_file, write_text_atomic
from ..errors import ModelLoadError

PATTERN_FILE = "full_attention_heads.tsv"
PATTERNS_DIR = Path(__file__).with_name("patterns")
# How far past [0, 1] a gate may lie: DuoAttention's released gates dip below 0 by bf16 training noise (down to
# -0.0014, Llama-2-7B-32K's); they are ranked as they are, not clipped (clipping would tie and reorder them).
GATE_SLACK = 0.01

# Other spellings of a bundled model's name (lower case) -> the bundled folder.
_ALIASES = {
    "llama-3.1-8b-instruct": "Meta-Llama-3.1-8B-Instruct",
    "llama-3-8b-gradient-1048k": "Llama-3-8B-Instruct-Gradient-1048k",
    "mistral-7b-instruct": "Mistral-7B-Instruct-v0.2",
    "smollm2-135m": "SmolLM2-135M-Instruct",
}


def load_pattern(path: str | Path, num_layers: int, num_kv_heads: int) -> np.ndarray:
    """Gates [num_layers, num_kv_heads] float64 from a DuoAttention TSV; ModelLoadError on any defect.

    Blank lines and lines starting with '#' are ignored; fields may be separated by tabs or spaces.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: head pattern file not found")
    # a regular file of bounded size (a FIFO or device is refused); a byte-order mark (Windows editors write one
    # in "UTF-8") is not part of the first gate
    text = read_text_file(path, "a head pattern").removeprefix("\ufeff")
    rows: list[list[float]] = []
    widths: set[int] = set()
    num_rows = 0
    # line by line, at most num_kv_heads + 1 fields split off a line, values read only of rows the shape can take:
    # a file of millions of fields (up to the size bound) made as many strings and floats, 1.8 GB for 64 MB, before
    # its shape was refused
    for line in re.finditer(r"[^\r\n]+", text):
        s = line.group().strip()
        if not s or s.startswith("#"):
            continue
        fields = s.split(maxsplit=num_kv_heads)
        width = len(fields)
        # the rest of the line holds the fields past the first ones: counted, not split
        if width > num_kv_heads:
            width += sum(1 for _ in re.finditer(r"\S+", fields[-1])) - 1
        widths.add(width)
        num_rows += 1
        if width != num_kv_heads or num_rows > num_layers:
            continue  # the shape is refused below
        try:
            vals = [float(f) for f in fields]
        except ValueError:
            bad = next(f for f in fields if not _is_float(f))
            raise ModelLoadError(
                f"{path}:{_lineno(text, line.start())}: non-numeric gate value {bad[:32]!r}"
            ) from None
        bad_gate = _gate_error(vals, len(rows))
        if bad_gate:
            raise ModelLoadError(f"{path}:{_lineno(text, line.start())}: {bad_gate}")
        rows.append(vals)
    if len(widths) > 1:
        raise ModelLoadError(f"{path}: ragged head pattern (rows have {sorted(widths)} columns)")
    got = (num_rows, widths.pop() if widths else 0)
    if got != (num_layers, num_kv_heads):
        raise ModelLoadError(
            f"{path}: head pattern is {got[0]} x {got[1]} (layers x KV heads); "
            f"the model needs {num_layers} x {num_kv_heads}"
        )
    return np.asarray(rows, dtype=np.float64)


def _gate_error(row: list[float], layer: int) -> str | None:
    """What is wrong with a layer's gates (None: nothing). A gate is a finite number in [0, 1] (DuoAttention's and
    calibrate's), give or take GATE_SLACK: another scale (a percentage, a logit, a score not divided by its maximum)
    or a NaN would rank heads by something no pattern means, and was taken without a word."""
    for head, v in enumerate(row):
        if not -GATE_SLACK <= v <= 1 + GATE_SLACK:  # False for NaN too
            what = "outside [0, 1]" if math.isfinite(v) else "not finite"
            return f"gate {v!r} of layer {layer}, KV head {head} is {what}"
    return None


def _lineno(text: str, pos: int) -> int:
    """The number of the line at `pos` of `text` (line ends as splitlines takes them: \\n, \\r\\n or \\r)."""
    return len(re.findall(r"\r\n|\r|\n", text[:pos])) + 1


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def save_pattern(path: str | Path, gates: np.ndarray) -> Path:
    """Write gates [L, Hkv] as a DuoAttention TSV (one row per layer, tab-separated), atomically: an engine
    reading the path sees the earlier pattern or this one, never a truncated one."""
    gates = np.asarray(gates, dtype=np.float64)
    if gates.ndim != 2:
        raise ValueError(f"gates must be a [layers, kv_heads] array, got shape {gates.shape}")
    bad = next(filter(None, (_gate_error(row.tolist(), layer) for layer, row in enumerate(gates))), None)
    if bad:  # a file load_pattern would refuse
        raise ValueError(bad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join("\t".join(f"{v:.18e}" for v in row) + "\n" for row in gates))
    return path


def num_streaming(static_sparsity: float, num_layers: int, num_kv_heads: int) -> int:
    """How many KV heads become streaming heads: round(s * L * Hkv) (Python's round)."""
    if not 0.0 <= static_sparsity <= 1.0:
        raise ValueError(f"static_sparsity must be in [0, 1], got {static_sparsity}")
    return int(round(static_sparsity * num_layers * num_kv_heads))


def head_classes(gates: np.ndarray, static_sparsity: float) -> list[np.ndarray]:
    """Per-layer int32 [Hkv] classes: 1 (streaming) for the round(s*L*Hkv) lowest gates over all layers.

    One global ranking; ties go to the earlier (layer, head) in row-major order, so the choice is
    deterministic and monotone in `static_sparsity` (a streaming head stays streaming as s grows).
    """
    gates = np.asarray(gates, dtype=np.float64)
    if gates.ndim != 2:
        raise ValueError(f"gates must be [layers, kv_heads], got shape {gates.shape}")
    n = num_streaming(static_sparsity, *gates.shape)
    order = np.argsort(gates.reshape(-1), kind="stable")
    flat = np.zeros(gates.size, np.int32)
    flat[order[:n]] = 1
    return list(flat.reshape(gates.shape))


def bundled_patterns() -> dict[str, Path]:
    """Shipped patterns: folder name -> TSV path."""
    if not PATTERNS_DIR.is_dir():
        return {}
    return {d.name: d / PATTERN_FILE for d in sorted(PATTERNS_DIR.iterdir()) if (d / PATTERN_FILE).is_file()}


def _model_names(model_name_or_dir: str | Path) -> list[str]:
    """The names a model may go by: its directory's (config.path_name's: `--model .` is its folder's name), a Hub
    name's last part, config.json's `_name_or_path`, and the GGUF a converted directory came from."""
    name = path_name(model_name_or_dir)
    names = [name, name.split("--")[-1]]  # a Hub cache folder: models--org--name
    cfg = Path(model_name_or_dir) / "config.json"
    if cfg.is_file():
        try:
            d = read_json_object(cfg)
        except ModelLoadError:  # the loader names what is wrong with it; here it only offers names
            d = {}
        for key in ("_name_or_path", "name_or_path"):
            if isinstance(d.get(key), str) and d[key]:
                names.append(d[key].rstrip("/").split("/")[-1])
        # `lserve-lite convert`'s directory: the GGUF file it came from names the model as that file does
        ours = d.get("lserve_lite")
        if isinstance(ours, dict) and isinstance(ours.get("converted_from"), str):
            names.append(ours["converted_from"])
    return [n for n in dict.fromkeys(names) if n]


def bundled_pattern(model_name_or_dir: str | Path) -> Path | None:
    """The pattern for a model, by directory or model name; None if nothing fits.

    Order: `full_attention_heads.tsv` inside the model directory itself; then a shipped folder whose
    name equals the model's name (case-insensitive, a leading "org/" or "org--" dropped), or prefixes it
    followed by "-", "_" or "." and not a version ("SmolLM2-135M-Instruct-q4_1", not "Mistral-7B-Instruct-v0.3");
    then a few known aliases.
    """
    local = Path(model_name_or_dir) / PATTERN_FILE
    if local.is_file():
        return local
    shipped = bundled_patterns()
    by_lower = {k.lower(): v for k, v in shipped.items()}
    aliases = {a: shipped[t] for a, t in _ALIASES.items() if t in shipped}
    for name in _model_names(model_name_or_dir):
        n = name.lower()
        for table in (by_lower, aliases):
            if n in table:
                return table[n]
        for table in (by_lower, aliases):
            hits = [k for k in table if n.startswith(k) and _suffix(n[len(k) :])]
            if hits:
                return table[max(hits, key=len)]
    return None


def _suffix(rest: str) -> bool:
    """What may follow a pattern's name in a model's: a tag after "-", "_" or "." ("-q4_1", ".gguf"), but not
    another version of the model ("-v0.3" after "mistral-7b-instruct": its heads were never calibrated)."""
    return rest[:1] in ("-", "_", ".") and re.match(r"v\d", rest[1:]) is None


def resolve_pattern(
    model_dir: str | Path, num_layers: int, num_kv_heads: int, pattern_path: str | Path | None = None
) -> np.ndarray:
    """Gates for a model: `pattern_path` if given, else the bundled one; ModelLoadError if none exists."""
    path = Path(pattern_path) if pattern_path else bundled_pattern(model_dir)
    if path is None:
        raise ModelLoadError(
            f"{model_dir}: no head pattern for this model; make one with "
            f"`lserve-lite calibrate --model {model_dir} --out PATTERN.tsv` and pass it as the pattern path"
        )
    return load_pattern(path, num_layers, num_kv_heads)
