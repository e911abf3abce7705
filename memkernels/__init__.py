"""memkernels: fused kernels for a trained slot-bank memory attached to a frozen LLM.

Layers, each importing only the ones before it:
- memkernels.ops: memory_read, memory_write, reading_layer (custom ops over
  C++/Triton/CUDA kernels) and their pure-PyTorch reference.
- memkernels.memory: MemoryConfig, MemoryModel (BlendMemory, AppendMemory),
  MemoryBank.
- memkernels.hf: attach a memory to a Hugging Face causal LM, store text.
- memkernels.train: Trainer (the memory trained with the LLM frozen).
- memkernels.apps: the recall benchmark, the demo, the benchmark harness.
"""
from memkernels.hf import MemoryHandle, attach, find_decoder_layers, store
from memkernels.memory import (AppendMemory, AppendOptions, BlendMemory, BlendOptions, Int8Rows,
                               MemoryBank, MemoryConfig, MemoryModel)
from memkernels.ops import (BACKENDS, MemoryReadFunction, MemoryWriteFunction, available_backends,
                            memory_read, memory_write, reading_layer, reading_layer_plan,
                            reference)

__version__ = "0.1.0"

__all__ = ["memory_read", "memory_write", "reading_layer", "reading_layer_plan",
           "MemoryReadFunction", "MemoryWriteFunction", "reference", "available_backends",
           "BACKENDS", "MemoryConfig", "BlendOptions", "AppendOptions", "MemoryModel",
           "BlendMemory", "AppendMemory", "MemoryBank", "Int8Rows", "attach", "store",
           "MemoryHandle", "find_decoder_layers", "__version__"]
