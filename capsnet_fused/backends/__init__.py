"""The fused routing backends: cpp.py (the C++/CUDA kernels of capsnet_fused._C, sources in
csrc/) and triton/ (op.py: the torch ops; launchers and kernels beside it). glue.py holds the
fakes and autograd that their torch ops share.

The backend contract, on which capsnet_fused.ops relies: each backend module (listed in
ops._BACKEND_MODULES) registers its torch op and exposes two functions:

    unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None
    routing(u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky, squash_eps)
        -> v

`routing` receives validated arguments of one floating dtype on one device (possibly
non-contiguous, possibly B = 0; prior and bias may be None; squash_eps a float >= 0) and
returns v [B, J, M] with autograd to u, weight, prior and bias.

Routing logits shared by the batch (shared_logits="mean" or "sum", issue 18) is a second pair
of functions, which a backend module has once it implements them:

    shared_logits_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None
    shared_routing(u, weight, prior, bias, iterations, softmax_over, detach_inner, leaky,
                   squash_eps, shared_logits) -> v

with the arguments of `routing` and shared_logits "mean" or "sum". A backend without them (or
whose reason is not None) makes dynamic_routing raise NotImplementedError: there is no silent
fallback to another backend.
"""
