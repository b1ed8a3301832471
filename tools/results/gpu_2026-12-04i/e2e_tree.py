"""bench_e2e run on another tree's package: python3 e2e_tree.py <tree root> <bench_e2e args...>"""

import sys

sys.path.insert(0, sys.argv[1])
import lserve_lite  # noqa: E402  (from the tree named first)

assert lserve_lite.__file__.startswith(sys.argv[1]), lserve_lite.__file__
sys.path.insert(0, "tools")
import bench_e2e  # noqa: E402

sys.exit(bench_e2e.main(sys.argv[2:]))
