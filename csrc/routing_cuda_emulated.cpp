// The CUDA kernels of routing_cuda.cu compiled as C++, to run on the CPU under the emulation of
// cuda_emulation.h (tests only: tests/cuda_emulation.py builds this file and routing_cuda.cpp
// with CAPSNET_FUSED_CUDA_EMULATION defined).
#ifndef CAPSNET_FUSED_CUDA_EMULATION
#error "routing_cuda_emulated.cpp is the emulated build; define CAPSNET_FUSED_CUDA_EMULATION"
#endif

#include "routing_cuda.cu"
