"""python -m capsnet_fused.benchmark [flags]: the same as `capsnet-fused bench`."""

import sys

from capsnet_fused.benchmark import main

sys.exit(main())
