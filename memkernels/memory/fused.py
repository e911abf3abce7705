"""The CPU fast path of a memory read at inference, and its memo.

A read without gradients on the CPU backend is one call of the fused reading
layer's plan (memkernels.ops.reading_layer_plan over the CPU kernel) holding
the reader's folded weights and the bank's cached keys/values. The plan is
memoised per bank and reader, so a decode step pays a check in builtins and
one C++ call that converts the hidden state alone (docs/design.md, "The
decode hot path"). This module is the only place that
decides whether the fast path applies; every other read goes through
memory_read (ATen ops around the read kernel).

A memo is valid while the tensors it was built from are unchanged (version
and storage: in-place updates, `.data =`), for the same dtypes and device,
and while no parameter or submodule of the memory was reassigned: torch's
global registration hooks count those, installed on first use.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from memkernels.memory.bank import Int8Rows, kernel_operands
from memkernels.memory.cache import Versioned
from memkernels.ops.nvtx import nvtx_range
from memkernels.ops.copy_mix import KERNEL_MAX_ROWS as COPY_MIX_MAX_ROWS
from memkernels.ops.copy_mix import cpu_kernel as copy_mix_kernel
from memkernels.ops.reading_layer import cpu_kernel, reading_layer_plan

# parameter/submodule (re)assignments on modules of a memory that a memo was
# built for (modules carry _OWNED once a memo of their memory exists)
_REGISTRATIONS = [0]
_OWNED = "_memkernels_memory_module"
_HOOKS: list = []
_MIX = "copy mix"  # the key of read_and_mix's memo among a bank's fused plans
# set to False to read through ATen ops (llm_overhead --unfused measures what it saves)
enabled = True


def _count_parameter(module, name, value):
    if module.__dict__.get(_OWNED):
        _REGISTRATIONS[0] += 1


def _count_module(module, name, value):
    if module.__dict__.get(_OWNED):
        _REGISTRATIONS[0] += 1
        if isinstance(value, nn.Module):
            _own(value)


def _own(module: nn.Module) -> None:
    if module.__dict__.get(_OWNED):  # owned already: later submodules are owned on assignment
        return
    if not _HOOKS:
        _HOOKS.append(torch.nn.modules.module.register_module_parameter_registration_hook(
            _count_parameter))
        _HOOKS.append(torch.nn.modules.module.register_module_module_registration_hook(
            _count_module))
    for m in module.modules():
        m.__dict__[_OWNED] = True


def forget_plans() -> None:
    """Makes every memoised fused read stale (rebuilt on its next use): for a
    change the memo's checks cannot see, such as a reader's scale."""
    _REGISTRATIONS[0] += 1


def read(memory, bank, reader_index: int, hidden: Tensor, kv_dtype: Optional[torch.dtype],
         context: Optional[Tensor] = None) -> Optional[Tensor]:
    """Reader `reader_index`'s read of `bank` (no gradients) through the fused
    reading layer, or None where it does not apply (then read through ATen ops)."""
    if not enabled:
        return None
    key = (_REGISTRATIONS[0], hidden.dtype, hidden.is_cpu, kv_dtype)
    plan = bank.fused_plans.get(reader_index)
    if plan is None or not plan.fresh(key):
        plan = _build(memory, bank, reader_index, hidden, kv_dtype)
        if plan is None:
            bank.fused_plans.pop(reader_index, None)
            return None
        bank.fused_plans[reader_index] = plan = Versioned(plan[0], plan[1], key)
    with nvtx_range("memkernels.reading_layer[cpu]"):
        return plan.value(hidden, context)


def read_and_mix(memory, bank, hidden: Tensor, logits: Tensor, head_weight: Tensor,
                 kv_dtype: Optional[torch.dtype],
                 context: Optional[Tensor] = None) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """The copy rule at inference (CopyMemory.mix_logits): (its read, the
    mixture's log p, or None where the mixture kernel does not take this
    call), or None where the fused read does not apply. The read's and the
    mixture's operands share one memo per bank, checked once per step."""
    if not enabled:
        return None
    key = (_REGISTRATIONS[0], hidden.dtype, hidden.is_cpu, kv_dtype, id(head_weight))
    plan = bank.fused_plans.get(_MIX)
    if plan is None or not plan.fresh(key):
        built = _build(memory, bank, 0, hidden, kv_dtype)
        if built is None:
            bank.fused_plans.pop(_MIX, None)
            return None
        layer, sources = built
        reader = memory.readers[0]
        mix_kernel = copy_mix_kernel(hidden.dtype, hidden.device, reader.backend) \
            if head_weight.dtype == hidden.dtype else None
        mix_args = (reader.norm.eps, *reader.mix_operands(head_weight))
        # the plan holds head_weight among its sources: its id is not reused while it lives
        plan = Versioned((layer, mix_kernel, mix_args), (
            *sources, *reader.mix_sources(head_weight)), key)
        bank.fused_plans[_MIX] = plan
    layer, mix_kernel, mix_args = plan.value
    with nvtx_range("memkernels.reading_layer[cpu]"):
        read = layer(hidden, context) - hidden  # the identity output projection
    if mix_kernel is None or logits.dtype != hidden.dtype or \
            hidden.shape[0] * hidden.shape[1] > COPY_MIX_MAX_ROWS:
        return read, None
    eps, unit_scale, gate_w, sharpness, gate_bias, gate_confidence = mix_args
    with nvtx_range("memkernels.copy_mix[cpu]"):
        return read, mix_kernel(hidden, logits, read, head_weight, gate_w, eps, sharpness,
                                gate_bias, gate_confidence, unit_scale)


def _build(memory, bank, reader_index: int, hidden: Tensor,
           kv_dtype: Optional[torch.dtype]) -> Optional[tuple]:
    """(the reading layer's plan, the tensors it derives from) of a fused read, or None."""
    if torch.compiler.is_compiling() or not memory.fused_read_applies(bank):
        return None
    reader = memory.readers[reader_index]
    keys, values = bank.keys_values(kv_dtype)
    kv = keys.data if isinstance(keys, Int8Rows) else keys
    if cpu_kernel(hidden, kv.dtype, reader.backend) is None:
        return None
    _own(memory)
    args, kwargs = reader.reading_layer_arguments(*kernel_operands(keys, values))
    index = bank.read_index(kv_dtype)
    if index is not None:  # the keys are sorted by cluster: each row reads its nearest
        centroids, starts, probes = index
        kwargs.update(centroids=centroids.to(hidden.dtype), cluster_starts=starts, probes=probes)
    query_w, keys, values, out_w, eps, scale, key_scale, value_scale = args
    layer = reading_layer_plan(query_w, keys, values, out_w, eps=eps, scale=scale,
                               key_scale=key_scale, value_scale=value_scale, backend="cpu",
                               **kwargs)
    return layer, (*bank.projection_sources(), *reader.weight_sources())
