// The ops capsnet_fused::cpp_routing_fwd / cpp_routing_bwd and, for routing logits shared by the
// batch, cpp_shared_routing_fwd / cpp_shared_routing_bwd, defined once here (their argument
// lists, with comments, in routing_schema.h); each device registers its kernels in its own file
// (routing_cpu.cpp, routing_cpu_shared.cpp, routing_cuda.cpp).
// Shapes: u [B, I, N], weight [I, J, N, M], prior [I, J] or None, v [B, J, M], R iterations.
#include <Python.h>
#include <torch/library.h>

#include "routing_schema.h"

extern "C" {
// `import capsnet_fused._C` only has to load this library so that the static registrations
// below run; the ops are reached through torch.ops.capsnet_fused, so the module is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(capsnet_fused, m) {
  m.def("cpp_routing_fwd" CAPSNET_ROUTING_FWD_SCHEMA);
  m.def("cpp_routing_bwd" CAPSNET_ROUTING_BWD_SCHEMA);
  m.def("cpp_shared_routing_fwd" CAPSNET_SHARED_ROUTING_FWD_SCHEMA);
  m.def("cpp_shared_routing_bwd" CAPSNET_SHARED_ROUTING_BWD_SCHEMA);
  // JSON describing the CPU kernels that calls in this process run: the instruction-set clone
  // ("x86-64-v4", "x86-64-v3" or "default"), the L2 bytes per core read at run time and the
  // u_hat cache setting with its decision at the MNIST shape (routing_cpu.cpp).
  m.def("cpp_kernel_info() -> str");
  // Frees the large scratch blocks that the CPU kernels keep between calls (at most 64 MB;
  // routing_cpu.cpp, ScratchPool) and returns their bytes.
  m.def("cpp_release_scratch() -> int");
}
