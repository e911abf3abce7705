"""The memory layer: what users train and what holds their knowledge.

- config: MemoryConfig (BlendOptions, AppendOptions).
- base: MemoryModel, the trained parameters; MemoryModel(config) is the
  write rule's class: blend.BlendMemory, append.AppendMemory or
  copy.CopyMemory (the read mixes stored tokens into the LM's output).
- bank: MemoryBank, the run-time content (one row per user or sequence),
  its key/value cache and file format; index: the clustered index of a
  large bank; context: the decayed context the append rule keys on.
- fused: the CPU fast path of a read at inference and its memo; cache: the
  versioned cache those use.
Reads go through memkernels.ops (memory_read, reading_layer) and writes
through memory_write; nothing here knows about Hugging Face models.
"""
from memkernels.memory.append import AppendMemory, AppendReader
from memkernels.memory.bank import Int8Rows, MemoryBank
from memkernels.memory.base import MemoryModel
from memkernels.memory.blend import BlendMemory, BlendReader
from memkernels.memory.config import AppendOptions, BlendOptions, MemoryConfig
from memkernels.memory.context import decayed_context
from memkernels.memory.copy import CopyMemory, CopyReader

__all__ = ["MemoryConfig", "BlendOptions", "AppendOptions", "MemoryModel", "BlendMemory",
           "AppendMemory", "CopyMemory", "BlendReader", "AppendReader", "CopyReader", "MemoryBank", "Int8Rows",
           "decayed_context"]
