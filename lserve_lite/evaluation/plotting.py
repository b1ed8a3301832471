"""matplotlib for the evaluation tools' PNGs: optional (not a dependency), headless, one place to say so."""

from __future__ import annotations

import sys


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
