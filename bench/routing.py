"""Routing benchmark: every backend against the reference and torch.compile(reference).

    python bench/routing.py            # default grid (MNIST shape, B 1-128, R 3, both modes)
    python bench/routing.py --full     # the whole grid; --help lists every flag

Same flags as `capsnet-fused bench` and `python -m capsnet_fused.benchmark`. Results go to
./bench-results/<device>.{csv,json,png}; the committed ones were written with
--out-dir bench/results.
"""

import sys
from pathlib import Path

# Runs from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capsnet_fused.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
