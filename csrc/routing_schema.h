// The arguments and results of the routing ops, shared by every op pair with this contract:
// capsnet_fused::cpp_routing_fwd / _bwd (ops.cpp) and the test-only
// capsnet_fused::cuda_emulated_routing_fwd / _bwd (routing_cuda.cpp, emulated build), so that
// both are defined by one schema. The Triton pair (capsnet_fused/backends/triton/op.py) has the
// same arguments.
#pragma once

// u [B, I, N], weight [I, J, N, M], prior [I, J] or None, bias [J, M] or None (added to s^t
// before every squash), leaky (one extra logit fixed at 0 on the softmax axis), squash_eps >= 0.
// Returns v [B, J, M] (dtype of u) and what the backward needs, in the compute dtype
// (float32 for float16/bfloat16 inputs): s [B, R, J, M] (the squash input s^t + bias),
// V [B, R, J, M] (V^{t-1}, the running sum of v before iteration t) and lse [B, R, J]
// (log-sum-exp over input capsules of the iteration-t logits, the leaky zero logit included)
// for softmax over in_caps, [B, 0, J] otherwise.
#define CAPSNET_ROUTING_FWD_SCHEMA                                                 \
  "(Tensor u, Tensor weight, Tensor? prior, Tensor? bias, int iterations, "       \
  "bool softmax_in_caps, bool detach_inner, bool leaky, float squash_eps) "       \
  "-> (Tensor, Tensor, Tensor, Tensor)"

// Exact gradients of v with respect to u, weight, prior and bias. An output not asked for
// (need_* false, or its input None) is returned with shape [0].
#define CAPSNET_ROUTING_BWD_SCHEMA                                                 \
  "(Tensor grad_v, Tensor u, Tensor weight, Tensor? prior, Tensor? bias, Tensor s, " \
  "Tensor V, Tensor lse, int iterations, bool softmax_in_caps, bool detach_inner, " \
  "bool leaky, float squash_eps, bool need_du, bool need_dweight, bool need_dprior, " \
  "bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)"

// Routing logits shared by the batch (issue 18): one logit tensor [I, J] for the whole batch,
// starting at the prior (or 0) and, after every iteration but the last, increased by the batch
// mean (batch_mean) or sum of the agreements u_hat_bij . v^t_bj, so that every sample is routed
// with the same couplings c^t [I, J]. Other arguments as above. Returns v [B, J, M] (dtype of
// u) and, in the compute dtype: s [B, R, J, M] (the squash input s^t + bias), v_iter
// [B, R, J, M] (v^t = squash(s^t), the output of every iteration) and c [R, I, J] (the
// couplings of every iteration, the leaky share excluded). The mean over B = 0 samples is 0.
#define CAPSNET_SHARED_ROUTING_FWD_SCHEMA                                                   \
  "(Tensor u, Tensor weight, Tensor? prior, Tensor? bias, int iterations, "                \
  "bool softmax_in_caps, bool detach_inner, bool leaky, float squash_eps, bool batch_mean) " \
  "-> (Tensor, Tensor, Tensor, Tensor)"

// Exact gradients of the shared-logits routing with respect to u, weight, prior and bias, from
// the forward's s, v_iter and c. An output not asked for (need_* false, or its input None) is
// returned with shape [0].
#define CAPSNET_SHARED_ROUTING_BWD_SCHEMA                                                   \
  "(Tensor grad_v, Tensor u, Tensor weight, Tensor? prior, Tensor? bias, Tensor s, "        \
  "Tensor v_iter, Tensor c, int iterations, bool softmax_in_caps, bool detach_inner, "      \
  "bool leaky, float squash_eps, bool batch_mean, bool need_du, bool need_dweight, "        \
  "bool need_dprior, bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)"
