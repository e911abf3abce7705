"""The Hugging Face layer: attach a memory to any causal LM kept frozen
(attach: forward hooks on its decoder layers, the handle that owns them),
and store text into a bank through the frozen model (encode)."""
from memkernels.hf.attach import MemoryHandle, attach, attached_handle, find_decoder_layers
from memkernels.hf.encode import WriteInputs, store, text_end_states, write_layer_hidden

__all__ = ["attach", "MemoryHandle", "attached_handle", "find_decoder_layers", "store",
           "write_layer_hidden", "text_end_states", "WriteInputs"]
