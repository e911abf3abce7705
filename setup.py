"""Builds memkernels._C: the CPU kernels always, the CUDA kernels when a
CUDA-enabled torch, nvcc and the CUDA runtime headers are all present
(MEMKERNELS_NO_CUDA=1 skips them).

Build without isolation so the extension compiles against the installed
torch: `pip install --no-build-isolation -e .`
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    # pyproject.toml does not list torch as a build requirement: an isolated build
    # would fetch another (multi-GB) torch and build against it, not against yours
    sys.exit("memkernels builds against the torch already installed: install torch first "
             "(pip install torch==2.13.0 for the CPU build), then "
             "pip install --no-build-isolation -e .")

HERE = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def want_cuda() -> tuple[bool, str]:
    """(build the CUDA kernels?, why not)."""
    if os.environ.get("MEMKERNELS_NO_CUDA") == "1":
        return False, "MEMKERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found"
    headers = glob.glob(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")) + glob.glob(
        os.path.join(CUDA_HOME, "targets", "*", "include", "cuda_runtime.h"))
    if not headers:
        return False, f"no cuda_runtime.h under {CUDA_HOME}"
    return True, ""


# The C++ standard is the one torch asks for. -fno-trapping-math (the kernels
# never read FP exception flags) lets GCC if-convert the clamps in the exp and
# gate loops: without it the AVX2 clones of those loops stayed scalar.
cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
link_flags = ["-fopenmp"]
# MEMKERNELS_SANITIZE=address,undefined (either or both): the CPU kernels built with GCC's
# sanitizers at -O1 with frame pointers, for scripts/sanitize.sh; never a build to time.
sanitize = os.environ.get("MEMKERNELS_SANITIZE", "")
if sanitize:
    unknown = set(sanitize.split(",")) - {"address", "undefined"}
    if unknown:
        sys.exit(f"MEMKERNELS_SANITIZE takes address and/or undefined, got {sorted(unknown)}")
    cxx_flags = ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}",
                 "-fno-sanitize-recover=all", "-fopenmp", "-fno-trapping-math"]
    link_flags = ["-fopenmp", f"-fsanitize={sanitize}"]
sources = rel("python/bindings.cpp") + rel("csrc/cpu/*.cpp")
with_cuda, why_not = want_cuda()
if with_cuda:
    # sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise (torch reads it).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        "memkernels._C",
        sources + rel("python/bindings_cuda.cpp") + rel("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags + ["-DMEMKERNELS_WITH_CUDA"],
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                                     "-DMEMKERNELS_WITH_CUDA"]},
        extra_link_args=link_flags,
    )
    print("memkernels: building the CPU and CUDA kernels "
          f"(TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
else:
    ext = CppExtension("memkernels._C", sources, extra_compile_args=cxx_flags,
                       extra_link_args=link_flags)
    print(f"memkernels: building the CPU kernels only, not the CUDA ones ({why_not})")

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
