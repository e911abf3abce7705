"""The C++/CUDA sources build on a machine without a GPU: every .cu file
compiles for sm_80 and sm_90 with the machine's nvcc, and the standalone
CMake build of the kernels configures, builds and passes its CPU check."""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils.cpp_extension import include_paths

from memkernels.ops import backend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def test_cuda_sources_exist():
    assert CUDA_SOURCES, "no CUDA sources found under csrc/cuda"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, arch, tmp_path):
    """Compiles with setup.py's flags. The PTX is kept and checked for tanh.approx.f32:
    --use_fast_math turns tanhf into it (relative error up to 2^-11), which the
    float32 gate blend and its gradients must not use (slot_math.h's mk_tanh)."""
    cmd = [NVCC, "-std=c++17", "-O3", "--use_fast_math", "-Werror", "all-warnings",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", source,
           "-o", str(tmp_path / "k.o"), "-keep", "-keep-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ptx = [open(f).read() for f in glob.glob(str(tmp_path / "*.ptx"))]
    assert ptx, "nvcc -keep wrote no PTX"
    assert not any("tanh.approx" in text for text in ptx), "a kernel uses tanh.approx.f32"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_standalone_build(tmp_path):
    build = tmp_path / "build"
    arch = ["-DCMAKE_CUDA_ARCHITECTURES=90"] if NVCC else []
    env = dict(os.environ)
    if NVCC:
        env.setdefault("CUDACXX", NVCC)
    for cmd in (["cmake", "-S", ROOT, "-B", str(build), *arch],
                ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the read against a naive one, and the write's outputs NaN-poisoned against zeroed: on the
    # best ISA, capped at AVX2, and on the GEMM fallback (the vendor BLAS where CMake found one,
    # else the loop nest); and the reading layer's BlockStealer handing out every block once
    for caps in ({}, {"MEMKERNELS_CPU_ISA": "avx2"}, {"MEMKERNELS_CPU_GEMM": "blas"}):
        check = subprocess.run([str(build / "memkernels_check_cpu")], capture_output=True,
                               text=True, timeout=300, env={**os.environ, **caps})
        assert check.returncode == 0, f"{caps}: {check.stdout + check.stderr}"
        assert "max |err|" in check.stdout and "0 NaN, 0 differ" in check.stdout, check.stdout
        assert "every block taken once" in check.stdout, check.stdout
    # the few-row read's hot-rate tool: checked against float64 where the CPU runs the body
    # (2 rows over 301 keys: the one-pass body on either ISA, a partial last step); it picks
    # the ISA as the extension does, and exits 2 only where no vector body applies
    hot = subprocess.run([str(build / "memkernels_few_rows_hot"), "2", "301", "32", "3"],
                         capture_output=True, text=True, timeout=300)
    ext = backend.extension()[0]
    vector_body = ext is not None and ext.cpu_isa() != "generic"
    assert hot.returncode == (0 if vector_body else 2), hot.stdout + hot.stderr
    assert ("max |err|" in hot.stdout) == vector_body, hot.stdout
    # its cold twin (the shared-bank decode from DRAM, in turns with a read of the same
    # bytes and with those bytes under the kernel's FMAs alone), small: 301 keys of 3 heads on
    # each body; 8 rows take the chunked pass on either ISA (then the same FMAs are also timed
    # in its order of reads), 2 rows of Dh 64 only on AVX2 (on AVX-512 the one-pass body)
    for caps in ({}, {"MEMKERNELS_CPU_ISA": "avx2"}):
        isa = ("avx2" if caps else ext.cpu_isa()) if vector_body else "generic"
        for rows in ("8", "2"):
            cold = subprocess.run([str(build / "memkernels_few_rows_cold"), rows, "301", "3", "2"],
                                  capture_output=True, text=True, timeout=300,
                                  env={**os.environ, **caps})
            assert cold.returncode == (0 if vector_body else 2), cold.stdout + cold.stderr
            assert ("of the FMA stream; max |err|" in cold.stdout) == vector_body, cold.stdout
            chunked = vector_body and (rows == "8" or isa == "avx2")
            assert ("in the chunked pass's order" in cold.stdout) == chunked, (caps, cold.stdout)
    # the reading layer's cold tool, small (77 slots, 2 timed calls), on any ISA: its last
    # call against the layer's float64 build
    reader = subprocess.run([str(build / "memkernels_reader_cold"), "77", "2"],
                            capture_output=True, text=True, timeout=300)
    assert reader.returncode == 0, reader.stdout + reader.stderr
    assert "the steps'; max |err| against float64" in reader.stdout, reader.stdout
    # the read backward's phases, small (37 rows over 600 keys, one timed call): run as the
    # kernel runs them, their dQ, dK, dV against read_backward's; on the tile GEMMs (AVX2 or
    # AVX-512), else it exits 2
    phases = subprocess.run([str(build / "memkernels_backward_phases"), "37", "600", "1"],
                            capture_output=True, text=True, timeout=300)
    tile_gemms = ext is not None and ext.cpu_tile_gemm() in ("avx2", "avx512")
    assert phases.returncode == (0 if tile_gemms else 2), phases.stdout + phases.stderr
    assert ("against read_backward's: max |difference|" in phases.stdout) == tile_gemms, \
        phases.stdout
    # and in turns with the backward as it would run with P kept over two key blocks (600 keys:
    # the second partial), both checked against read_backward's
    kept = subprocess.run([str(build / "memkernels_backward_phases"), "37", "600", "1", "64", "1"],
                          capture_output=True, text=True, timeout=300)
    assert kept.returncode == (0 if tile_gemms else 2), kept.stdout + kept.stderr
    assert ("with P kept: dQ, dK, dV against read_backward's" in kept.stdout) == tile_gemms, \
        kept.stdout
    # the tile GEMM's hot rate, small and odd (37 rows, 48 columns), A row-major and
    # transposed, its product against float64, on each body the CPU runs: over 301 steps (no
    # prefetching steps), and A row-major over 5, 20 and 64 (the next rows warmed: all steps,
    # 12 of 20 and 24 of 64 in the prefetching loop); exits 2 where no tile GEMM body applies
    for caps in ({}, {"MEMKERNELS_CPU_ISA": "avx2"}):
        for k, transposed in (("301", "0"), ("301", "1"), ("5", "0"), ("20", "0"), ("64", "0")):
            gemm = subprocess.run([str(build / "memkernels_gemm_hot"), "37", "48", k, transposed,
                                   "2"], capture_output=True, text=True, timeout=300,
                                  env={**os.environ, **caps})
            assert gemm.returncode == (0 if tile_gemms else 2), gemm.stdout + gemm.stderr
            assert ("against float64: max |difference|" in gemm.stdout) == tile_gemms, \
                (caps, k, transposed, gemm.stdout)
    # the few-row read's chunked pass step by step (8 rows over 1,201 keys of Dh 32: three
    # chunks of 512 keys or ten of 128, the last ending in a partial 4-key step), its output
    # against few_rows_read's, on each body the CPU runs; exits 2 where no vector body applies
    for caps in ({}, {"MEMKERNELS_CPU_ISA": "avx2"}):
        steps = subprocess.run([str(build / "memkernels_few_rows_phases"), "8", "1201", "32", "2"],
                               capture_output=True, text=True, timeout=300,
                               env={**os.environ, **caps})
        assert steps.returncode == (0 if vector_body else 2), steps.stdout + steps.stderr
        assert ("against few_rows_read's: max |difference|" in steps.stdout) == vector_body, \
            steps.stdout
    # the plain reads of the layer's bytes it is timed against, and the ways a kernel could
    # overlap them: every way sums every byte of a set to the one pass's total
    chain = subprocess.run([str(build / "memkernels_chain_reads"), "77", "2"],
                           capture_output=True, text=True, timeout=300)
    assert chain.returncode == 0, chain.stdout + chain.stderr
    assert "the first step warming the rest" in chain.stdout, chain.stdout
    assert chain.stdout.rstrip().endswith("sums agree"), chain.stdout


CUDA_INCLUDE = next((p for p in ("/usr/local/cuda/include",
                                 os.path.join(os.path.dirname(os.path.dirname(NVCC or "")), "include"))
                     if os.path.exists(os.path.join(p, "cuda_runtime.h"))), None)


@pytest.mark.skipif(shutil.which("g++") is None or CUDA_INCLUDE is None,
                    reason="needs g++ and the CUDA runtime headers")
def test_cuda_bindings_parse_against_the_torch_headers(tmp_path):
    """python/bindings_cuda.cpp, which only a CUDA build compiles, parses against
    the installed torch's headers (a CPU wheel lacks one generated CUDA header:
    a stub stands in), so a binding edit is checked on a machine without a GPU."""
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-DMEMKERNELS_WITH_CUDA",
           *(f"-I{p}" for p in include_paths()), f"-I{tmp_path}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{CUDA_INCLUDE}",
           os.path.join(ROOT, "python", "bindings_cuda.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
