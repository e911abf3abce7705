"""memkernels: fused kernels for a trained slot-bank memory attached to a frozen LLM.

Public ops: memory_read, memory_write (see memkernels.ops). The memory model
and LLM integration: MemoryConfig, MemoryModel (AppendMemory for the append
write rule; build_memory picks by config), MemoryBank, attach. Ground truth:
memkernels.reference. Backends: memkernels.available_backends().
"""
from memkernels import reference
from memkernels._backend import BACKENDS
from memkernels.ops import MemoryReadFunction, MemoryWriteFunction, memory_read, memory_write
from memkernels.memory import Int8Rows, MemoryBank, MemoryConfig, MemoryModel, build_memory  # noqa: E402
from memkernels.append_memory import AppendMemory  # noqa: E402
from memkernels.integration import MemoryHandle, attach, find_decoder_layers  # noqa: E402

__version__ = "0.1.0"


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on tensors on `device` in this process."""
    import torch  # noqa: PLC0415

    from memkernels._backend import available  # noqa: PLC0415
    dev = torch.device(device)
    return [b for b in BACKENDS[1:] if available(b, dev)[0]]


__all__ = ["memory_read", "memory_write", "MemoryReadFunction", "MemoryWriteFunction",
           "MemoryConfig", "MemoryModel", "AppendMemory", "build_memory", "MemoryBank", "Int8Rows", "attach", "MemoryHandle",
           "find_decoder_layers", "reference", "available_backends", "BACKENDS", "__version__"]
