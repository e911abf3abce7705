"""Tiny Hugging Face causal LMs built from configs (float64, so that cached
generation and full recomputation compare tightly), and small memories for them."""
from __future__ import annotations

import pytest
import torch

from memkernels import MemoryBank, MemoryConfig, MemoryModel

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra (transformers)")

VOCAB = 97


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def tiny_neox():
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                                     num_hidden_layers=3, num_attention_heads=4,
                                     max_position_embeddings=128)
    return transformers.GPTNeoXForCausalLM(cfg).double().eval()


def _no_eos(build):
    def wrapped():  # random weights: let generation run its full length
        model = build()
        model.generation_config.eos_token_id = None
        return model
    return wrapped


MODELS = {name: _no_eos(b) for name, b in
          {"llama": tiny_llama, "gpt2": tiny_gpt2, "neox": tiny_neox}.items()}


def make_memory(model, *, slots=16, open_gates=False, **overrides):
    config = MemoryConfig.from_hf(model.config, num_heads=2, head_dim=8, num_slots=slots,
                                  **overrides)
    memory = MemoryModel(config).double()
    if open_gates:  # a "trained" memory: reads change the output
        with torch.no_grad():
            for r in memory.readers:
                r.gate.uniform_(0.5, 1.5)
                r.out.weight.mul_(4)
    return memory


def random_bank(memory, rows=1):
    return MemoryBank(memory, torch.randn(rows, memory.config.num_heads, memory.config.num_slots,
                                          memory.config.head_dim, dtype=torch.float64))


def ids(batch, length):
    return torch.randint(1, VOCAB, (batch, length))
