// The op schema of capsnet_fused::cpp_routing_fwd / cpp_routing_bwd, defined once here; each
// device registers its kernels in its own file (routing_cpu.cpp, routing_cuda.cpp).
// Shapes: u [B, I, N], weight [I, J, N, M], prior [I, J] or None, v [B, J, M], R iterations.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import capsnet_fused._C` only has to load this library so that the static registrations
// below run; the ops are reached through torch.ops.capsnet_fused, so the module is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(capsnet_fused, m) {
  // Returns v [B, J, M] (dtype of u) and what the backward needs, in the compute dtype
  // (float32 for float16/bfloat16 inputs): s [B, R, J, M] (s^t), V [B, R, J, M] (V^{t-1}, the
  // running sum of v before iteration t) and lse [B, R, J] (log-sum-exp over input capsules of
  // the iteration-t logits) for softmax over in_caps, [B, 0, J] otherwise.
  m.def(
      "cpp_routing_fwd(Tensor u, Tensor weight, Tensor? prior, int iterations, "
      "bool softmax_in_caps, bool detach_inner) -> (Tensor, Tensor, Tensor, Tensor)");
  // Exact gradients of v with respect to u, weight and prior. An output not asked for
  // (need_* false, or no prior) is returned with shape [0].
  m.def(
      "cpp_routing_bwd(Tensor grad_v, Tensor u, Tensor weight, Tensor? prior, Tensor s, "
      "Tensor V, Tensor lse, int iterations, bool softmax_in_caps, bool detach_inner, "
      "bool need_du, bool need_dweight, bool need_dprior) -> (Tensor, Tensor, Tensor)");
  // JSON describing the CPU kernels that calls in this process run: the instruction-set clone
  // ("x86-64-v4", "x86-64-v3" or "default"), the L2 bytes per core read at run time and the
  // u_hat cache setting with its decision at the MNIST shape (routing_cpu.cpp).
  m.def("cpp_kernel_info() -> str");
}
