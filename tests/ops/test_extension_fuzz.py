"""Every binding of memkernels._C called with each argument wrong in turn
(extension_fuzz_child.py: other dtypes, strides, shapes, devices, None,
out-of-range integers and index values, NaN and huge scalars), in a child
process a binding: no call may crash the process or raise anything but the
errors a bad argument raises. The valid call each starts from must return."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import memkernels
from helpers import cpu_extension

CHILD = os.path.join(os.path.dirname(__file__), "extension_fuzz_child.py")
BINDINGS = ["read_fwd", "read_fwd_keeping_probs", "read_bwd", "write_fwd", "write_bwd",
            "reader_fwd", "ReaderPlan", "copy_mix_fwd", "postings_top", "cpu_sum_in_turn"]
# the bindings that take no tensor: the CPU's probes and the host buffer pool's controls
# (test_adversarial.py gives the probes any integer)
NO_TENSORS = {"cpu_cached_bytes", "cpu_empty_cache", "cpu_few_rows_chunk",
              "cpu_few_rows_key_major", "cpu_fma_burst", "cpu_gemm_l1_burst", "cpu_isa",
              "cpu_tile_gemm",
              "has_vendor_blas"}


def test_every_binding_is_fuzzed():
    ext = cpu_extension()
    names = {n for n in dir(ext) if not n.startswith("_") and callable(getattr(ext, n))}
    assert names - NO_TENSORS - set(BINDINGS) == set(), "a new binding: add it to BINDINGS " \
        "and a valid call of it to extension_fuzz_child.valid_calls"


@pytest.mark.parametrize("binding", BINDINGS)
def test_no_bad_argument_crashes_the_extension(binding):
    ext = cpu_extension()
    if not hasattr(ext, binding):
        pytest.skip(f"this build of memkernels._C has no {binding}")
    # the child imports the memkernels this process did (a script's own folder, not the
    # working directory, leads its import path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(memkernels.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, CHILD, binding], capture_output=True, text=True,
                          timeout=600, env=env)
    lines = proc.stdout.splitlines()
    last = next((ln for ln in reversed(lines) if " returned" not in ln and " raised " not in ln),
                "(no call started)")
    assert proc.returncode == 0 and lines and lines[-1].startswith("DONE"), (
        f"the process ended ({proc.returncode}) on {last}: {proc.stderr[-3000:]}")
    calls = int(lines[-1].split()[1])
    raised = sum(" raised " in ln for ln in lines)
    assert calls >= 50 and raised >= calls // 4, proc.stdout[-3000:]  # the mutations ran and bit
