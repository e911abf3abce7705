// Hook for the CUDA bindings (python/bindings_cuda.cpp), compiled only when
// setup.py builds with CUDA; the CPU-only build gets these empty stubs.
#pragma once
#include <torch/extension.h>

namespace memkernels {
#ifdef MEMKERNELS_WITH_CUDA
void register_cuda_bindings(pybind11::module_& m);
inline bool with_cuda() { return true; }
#else
inline void register_cuda_bindings(pybind11::module_&) {}
inline bool with_cuda() { return false; }
#endif
}  // namespace memkernels
