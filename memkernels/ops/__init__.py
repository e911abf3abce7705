"""The ops layer: fused kernels behind torch ops, over a pure-PyTorch reference.

- memory_read / memory_write (api): token queries read a slot bank; slots
  attend over new tokens and blend the result in through gates. Each is a
  torch.library custom op pair (forward, backward) with a fake
  implementation, tied by an autograd.Function (MemoryReadFunction,
  MemoryWriteFunction), behind a public function that checks its arguments
  (checks) and picks a backend (backend: reference, cpu, triton, cuda).
- reading_layer (reading_layer): one memory reading layer at inference as
  one op (the decode hot path); CPU kernel and reference. reading_layer_plan
  binds its operands once for a decode loop.
- copy_mix (copy_mix): the copy rule's mixture of the memory's and the LM's
  next-token distributions (a decode step's as one CPU kernel call).
- postings_top (postings): the texts of highest summed posting score over
  an inverted index (the lexical index's selection as one CPU kernel call).
- cpu_cached_bytes / empty_cpu_cache (backend): the host buffers the CPU
  kernels keep for reuse between training steps, and their release.
- reference: the ground truth of all five.
Nothing here knows about memories, banks or LLMs.
"""
from memkernels.ops import reference
from memkernels.ops.api import MemoryReadFunction, MemoryWriteFunction, memory_read, memory_write
from memkernels.ops.backend import BACKENDS, available_backends, cpu_cached_bytes, empty_cpu_cache
from memkernels.ops.copy_mix import copy_mix
from memkernels.ops.postings import postings_top
from memkernels.ops.reading_layer import reading_layer, reading_layer_plan

__all__ = ["memory_read", "memory_write", "reading_layer", "reading_layer_plan", "copy_mix",
           "postings_top", "MemoryReadFunction", "MemoryWriteFunction", "reference", "BACKENDS",
           "available_backends", "cpu_cached_bytes", "empty_cpu_cache"]
