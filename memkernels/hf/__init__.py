"""The Hugging Face layer: attach a memory to any causal LM kept frozen
(attach: forward hooks on its decoder layers, the handle that owns them),
store text into a bank through the frozen model (encode), and keep a
generated copy on the stored text it continues (continuation)."""
from memkernels.hf.attach import MemoryHandle, attach, attached_handle, find_decoder_layers
from memkernels.hf.continuation import StoredTextContinuation
from memkernels.hf.encode import WriteInputs, store, text_end_states, write_layer_hidden

__all__ = ["attach", "MemoryHandle", "attached_handle", "find_decoder_layers", "store",
           "write_layer_hidden", "text_end_states", "WriteInputs", "StoredTextContinuation"]
