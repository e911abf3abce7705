"""Shared fixtures: which backends this machine can test, and on what device.

cpu: always (needs the built extension). triton: on a GPU, or on the CPU under
TRITON_INTERPRET=1 (how CI checks it). cuda: only with a GPU and a CUDA build.
"""
import os
import zlib

import pytest
import torch

import memkernels
from memkernels.ops import backend as _backend

HAS_GPU = torch.cuda.is_available()


def backend_device(name: str) -> torch.device:
    return torch.device("cuda" if name in ("cuda", "triton") and HAS_GPU else "cpu")


def _backend_params():
    params = []
    for name in ("cpu", "triton", "cuda"):
        ok, why = _backend.available(name, backend_device(name))
        params.append(pytest.param(name, marks=pytest.mark.skipif(not ok, reason=why), id=name))
    return params


@pytest.fixture(params=_backend_params())
def backend(request):
    return request.param


@pytest.fixture
def device(backend):
    return backend_device(backend)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Random inputs per test, reproducible from the test id (crc32: Python's str
    # hash changes per process); MK_SEED=n draws a fresh set for a stress run.
    seed = zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("MK_SEED", "0"))
    torch.manual_seed(seed % 2**31)


def pytest_report_header(config):
    ext, why = _backend.extension()
    return (f"memkernels {memkernels.__version__}; torch {torch.__version__}; "
            f"_C: {'built' if ext else 'MISSING: ' + why}; GPU: {HAS_GPU}; "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
