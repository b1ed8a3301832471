"""matplotlib for the evaluation tools' PNGs: optional (not a dependency), headless, one place to say so; and
the earlier run's JSON that `--plot-only` redraws."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from ..config import read_text_file, write_text_atomic
from ..errors import InvalidRequestError
from .eval_args import stem_file


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note on stderr) when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def finish_figure(plt, fig, path: Path, title: str) -> bool:
    """The evaluation plots' common ending (`plt` from `pyplot()`): the title, a tight layout, `path` written at
    110 dpi, the figure closed (pyplot keeps every open one alive); True, the draw functions' 'a PNG was written'."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def load_result(path: str | Path, tool: str) -> dict:
    """The JSON an earlier run of `tool` wrote (its "tool" field), for `--plot-only`: a missing, unreadable or
    foreign file is one LServeError, not a traceback from the plot; read as every JSON file (a FIFO hung it)."""
    path = Path(path)
    try:
        res = json.loads(read_text_file(path, "a results JSON"))
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(res, dict) or res.get("tool") != tool:
        raise InvalidRequestError(f"{path}: not the JSON written by {tool}")
    return res


def save_result(out: str | Path, result: dict, draw: Callable[[dict, Path], bool]) -> str:
    """Write <out>.json and, with `draw` (False without matplotlib), <out>.png; the line saying what was written."""
    js, png = stem_file(out, ".json"), stem_file(out, ".png")
    js.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(js, json.dumps(result, indent=1) + "\n")
    return f"wrote {js}" + (f" and {png}" if draw(result, png) else "")
