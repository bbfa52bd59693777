"""End-to-end benchmark: CapsNet training step and inference, reference router vs fused.

    python bench/end_to_end.py                  # batch 128, every available fused backend
    python bench/end_to_end.py --e2e-batch 32 --repeats 3

Same as `capsnet-fused bench --end-to-end`. Results go to
./bench-results/<device>-end-to-end.{csv,json}; the committed ones were written with
--out-dir bench/results.
"""

import sys
from pathlib import Path

# Runs from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capsnet_fused.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--end-to-end", *sys.argv[1:]]))
