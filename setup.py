"""Builds memkernels._C: the CPU kernels always, the CUDA kernels when a
CUDA-enabled torch and nvcc are present (MEMKERNELS_NO_CUDA=1 skips them).

Build without isolation so the extension compiles against the installed
torch: `pip install --no-build-isolation -e .`
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def want_cuda() -> bool:
    if os.environ.get("MEMKERNELS_NO_CUDA") == "1":
        return False
    return (torch.version.cuda is not None and CUDA_HOME is not None
            and os.path.exists(os.path.join(HERE, "python/bindings_cuda.cpp")))


# The C++ standard is the one torch asks for. -fno-trapping-math (the kernels
# never read FP exception flags) lets GCC if-convert the clamps in the exp and
# gate loops: without it the AVX2 clones of those loops stayed scalar.
cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
sources = rel("python/bindings.cpp") + rel("csrc/cpu/*.cpp")
if want_cuda():
    # sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise (torch reads it).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        "memkernels._C",
        sources + rel("python/bindings_cuda.cpp") + rel("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags + ["-DMEMKERNELS_WITH_CUDA"],
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                                     "-DMEMKERNELS_WITH_CUDA"]},
        extra_link_args=["-fopenmp"],
    )
    print("memkernels: building the CPU and CUDA kernels "
          f"(TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
else:
    ext = CppExtension("memkernels._C", sources, extra_compile_args=cxx_flags,
                       extra_link_args=["-fopenmp"])
    print("memkernels: building the CPU kernels only (no CUDA torch or nvcc found)")

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
