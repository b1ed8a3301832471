"""RULER-style accuracy suite, dense vs LServe settings: a thin wrapper of `lserve-lite eval`.

Usage: python tools/eval_ruler.py [--lengths 2048,4096] [--samples 4] [--configs "dense;lserve"] [--out STEM]
(options: `lserve-lite eval --help`; docs/ACCURACY.md has the runs and their commands)
"""

from __future__ import annotations

import sys

from lserve_lite.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
