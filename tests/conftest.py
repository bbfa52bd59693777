import os

import torch

# The Triton interpreter is chosen when kernels are decorated, so it must be set before any
# capsnet_fused module with @triton.jit kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
