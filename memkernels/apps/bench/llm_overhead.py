"""Per-token decode overhead of an attached memory on a small Llama-style LM.

    python -m memkernels.apps.bench.llm_overhead [--out DIR] [--heads 4 --head-dim 32]

A Llama-style model built from a config (8 layers, hidden 512, 8 heads,
random weights: latency does not depend on what the weights are), greedy
decoding with the KV cache, with and without a memory of S=4096 slots read at
2 layers, one bank per row (or --bank shared), batch 1 and 8, the bank's
cached keys/values in float32, bfloat16 and int8 (--kv-dtype). Per-token time
is the median decode step inside one generate() (per_token_seconds); the
two conditions are interleaved (base, memory, memory, base in each rep) and the
overhead is the median over reps of each rep's ratio; the two base runs of a
rep differ by the printed noise (median |base2 / base1 - 1|).

The floor: a decode step streams the model's weights once and, per reading
layer, each row's bank keys and values. When both come from DRAM the
overhead cannot be below bank bytes / weight bytes; it is printed beside the
measured overhead.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import torch

import memkernels
from memkernels.apps.bench.report import append_jsonl
from memkernels.apps.bench.run import machine_info
from memkernels.memory import AppendOptions, MemoryBank, MemoryConfig, MemoryModel, fused

LLAMA = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)


def build_model(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM  # optional dependency ([hf])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).to(dtype).eval()
    model.generation_config.eos_token_id = None  # decode the full length
    return model


def per_token_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Median time of one decode step: the time between the starts of
    consecutive forward calls in one generate() (the first, prefill, is left
    out). A median over steps is not moved by the occasional step that a
    noisy machine stretches, which a whole-run mean is."""
    starts = []
    hook = model.register_forward_pre_hook(lambda module, args: starts.append(time.perf_counter()))
    try:
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt),
                           max_new_tokens=new_tokens + 1, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    return statistics.median(b - a for a, b in zip(starts[1:], starts[2:]))


def build_memory_for(model, heads: int, head_dim: int, slots: int, write_rule: str,
                     context_decay: float = 0.0):
    """blend: `heads` heads; append: `heads` (address, content) pairs, so both
    read the same bytes of keys and values per token (context_decay: append
    only, MemoryConfig.context_decay)."""
    options = dict(append=AppendOptions(context_decay=context_decay)) if write_rule == "append" else {}
    config = MemoryConfig.from_hf(model.config, num_heads=heads * (2 if write_rule == "append"
                                                                   else 1),
                                  head_dim=head_dim, num_slots=slots, write_rule=write_rule,
                                  **options)
    return MemoryModel(config)


def measure(batch: int, heads: int, head_dim: int, slots: int, reps: int, new_tokens: int,
            dtype: torch.dtype, kv_dtype: torch.dtype, shared_bank: bool = False,
            write_rule: str = "blend", context_decay: float = 0.0) -> dict:
    model = build_model(dtype)
    memory = build_memory_for(model, heads, head_dim, slots, write_rule,
                              context_decay).to(dtype).eval()
    config = memory.config
    with torch.no_grad():  # open the gates so the read is not optimised away by anyone
        for r in memory.readers:
            r.gate.fill_(0.1)
    bank_rows = 1 if shared_bank else batch
    bank = MemoryBank.stack([MemoryBank(memory, torch.randn_like(memory.new_bank().mem))
                             for _ in range(bank_rows)])
    prompt = torch.randint(0, LLAMA["vocab_size"], (batch, 16))
    base, with_memory, ratios, base_vs_base = [], [], [], []

    def with_memory_run():
        with memkernels.attach(model, memory, bank, kv_dtype=kv_dtype):
            return per_token_seconds(model, prompt, new_tokens)
    per_token_seconds(model, prompt, 4)  # warm-up
    for _ in range(reps):
        # base, memory, memory, base: drift and whatever the first run of a rep
        # pays cancel in the rep's ratio; the two base runs measure the noise
        b1 = per_token_seconds(model, prompt, new_tokens)
        m1, m2 = with_memory_run(), with_memory_run()
        b2 = per_token_seconds(model, prompt, new_tokens)
        base += [b1, b2]
        with_memory += [m1, m2]
        ratios.append((m1 + m2) / (b1 + b2) - 1)
        base_vs_base.append(abs(b2 / b1 - 1))
    weight_bytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    # int8 keys/values carry a float32 scale per slot
    slot_bytes = head_dim * kv_dtype.itemsize + (4 if kv_dtype == torch.int8 else 0)
    bank_bytes = len(config.read_layers) * bank_rows * 2 * heads * slots * slot_bytes
    b, m = statistics.median(base), statistics.median(with_memory)
    return dict(batch=batch, bank="shared" if shared_bank else "per row", write_rule=write_rule,
                context_decay=config.context_decay, heads=heads, head_dim=head_dim, slots=slots,
                read_layers=list(config.resolved_read_layers), dtype=str(dtype).split(".")[-1],
                kv_dtype=str(kv_dtype).split(".")[-1],
                base_ms=1e3 * b, memory_ms=1e3 * m, overhead=statistics.median(ratios),
                noise=statistics.median(base_vs_base),
                weight_mb=weight_bytes / 1e6, bank_mb_per_token=bank_bytes / 1e6,
                floor=bank_bytes / weight_bytes, reps=reps, new_tokens=new_tokens)


def profile_reads(batch: int, heads: int, head_dim: int, slots: int, kv_dtype: torch.dtype,
                  new_tokens: int = 40, write_rule: str = "blend", fused_layer: bool = True,
                  context_decay: float = 0.0, index_probes: int = 0) -> dict:
    """Median time of one memory read inside the decode loop, and of the fused
    C++ layer call within it (the rest is Python and small ops); with
    fused_layer=False of the same read through ATen ops (what the fused layer saves)."""
    model = build_model(torch.float32)
    memory = build_memory_for(model, heads, head_dim, slots, write_rule, context_decay).eval()
    with torch.no_grad():
        for r in memory.readers:
            r.gate.fill_(0.1)
    bank = MemoryBank.stack([MemoryBank(memory, torch.randn_like(memory.new_bank().mem))
                             for _ in range(batch)])
    if index_probes:  # MemoryBank.build_index (one-row banks)
        bank.build_index(probes=index_probes)
    reads, calls = [], []
    pick = fused.cpu_kernel

    def timed_kernel(*args):
        kernel = pick(*args)
        if kernel is None:
            return None

        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            out = kernel(*args, **kwargs)
            calls.append(time.perf_counter() - start)
            return out
        return timed_call
    memory_class = type(memory)
    read = memory_class.read

    def timed_read(self, *args):
        start = time.perf_counter()
        out = read(self, *args)
        reads.append(time.perf_counter() - start)
        return out
    memory_class.read = timed_read
    fused.cpu_kernel, fused.enabled = timed_kernel, fused_layer
    try:
        prompt = torch.randint(0, LLAMA["vocab_size"], (batch, 16))
        with memkernels.attach(model, memory, bank, kv_dtype=kv_dtype), torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt),
                           max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    finally:
        memory_class.read = read
        fused.cpu_kernel, fused.enabled = pick, True
    return dict(read_us=1e6 * statistics.median(reads),
                fused_call_us=1e6 * statistics.median(calls) if calls else None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--heads", type=int, nargs="+", default=[4])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[32])
    ap.add_argument("--slots", type=int, default=4096)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--kv-dtype", nargs="+", default=["float32", "bfloat16", "int8"],
                    choices=["float32", "bfloat16", "int8"],
                    help="dtype of the cached bank keys/values (int8: a float32 scale per slot)")
    ap.add_argument("--bank", nargs="+", default=["per-row"], choices=["per-row", "shared"],
                    help="a bank per sequence (the issue's case) or one bank shared by the batch")
    ap.add_argument("--write-rule", nargs="+", default=["blend"], choices=["blend", "append"],
                    help="the memory's write rule (append: --heads pairs of address and "
                         "content heads, an MLP query, a cosine read)")
    ap.add_argument("--context-decay", type=float, nargs="+", default=[0.0],
                    help="append rule: MemoryConfig.context_decay (0: none); each value is a row")
    ap.add_argument("--index-probes", type=int, nargs="+", default=[0],
                    help="with --profile, B=1: read the bank through an index with this many "
                         "probes (MemoryBank.build_index; 0: exact); each value is a row")
    ap.add_argument("--out", default=None,
                    help="directory: llm_overhead.md (this run's table) and the rows appended "
                         "to llm-overhead-cpu.jsonl (every run on this machine kind)")
    ap.add_argument("--profile", action="store_true",
                    help="instead: time one read inside the decode loop, and its fused call")
    ap.add_argument("--unfused", action="store_true",
                    help="with --profile: also time the read without the fused C++ layer")
    args = ap.parse_args(argv)
    if args.profile:
        for (heads, head_dim), batch, kv, rule, decay, probes in itertools.product(
                zip(args.heads, args.head_dim), args.batch, args.kv_dtype, args.write_rule,
                args.context_decay, args.index_probes):
            if (decay or probes) and rule != "append" or (probes and batch != 1):
                continue
            p = profile_reads(batch, heads, head_dim, args.slots, getattr(torch, kv),
                              write_rule=rule, context_decay=decay, index_probes=probes)
            fused = (f"of which the fused C++ layer {p['fused_call_us']:.0f} us"
                     if p["fused_call_us"] is not None else "not fused")
            if args.unfused:
                u = profile_reads(batch, heads, head_dim, args.slots, getattr(torch, kv),
                                  write_rule=rule, fused_layer=False, context_decay=decay)
                fused += f"; {u['read_us']:.0f} us without the fused layer"
            rule += (f" (context {decay})" if decay else "") + (f" (index, {probes} probes)"
                                                                 if probes else "")
            print(f"B={batch} {rule} memory {heads}x{head_dim}, S={args.slots}, K/V {kv}: one read "
                  f"{p['read_us']:.0f} us in the decode loop, {fused}")
        return
    rows = []
    for (heads, head_dim), batch, kv, bank, rule, decay in itertools.product(
            zip(args.heads, args.head_dim), args.batch, args.kv_dtype, args.bank, args.write_rule,
            args.context_decay):
        if (bank == "shared" and batch == 1) or (decay and rule != "append"):
            continue  # the same as per-row; a context is the append rule's
        row = measure(batch, heads, head_dim, args.slots, args.reps, args.new_tokens,
                      torch.float32, getattr(torch, kv), shared_bank=bank == "shared",
                      write_rule=rule, context_decay=decay)
        rows.append(row)
        rule += f" (context {decay})" if decay else ""
        print(f"B={batch} {rule} memory {heads}x{head_dim}, S={args.slots}, K/V {kv}, bank {bank}: "
              f"{row['base_ms']:.2f} ms/token -> {row['memory_ms']:.2f} ms/token, "
              f"overhead {100 * row['overhead']:+.1f}% (base vs base {100 * row['noise']:.1f}%) "
              f"(floor {100 * row['floor']:.1f}%: {row['bank_mb_per_token']:.1f} MB of bank "
              f"per token over {row['weight_mb']:.0f} MB of weights)", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        append_jsonl(os.path.join(args.out, "llm-overhead-cpu.jsonl"), rows,
                     {**machine_info(torch.device("cpu")), "model": LLAMA})
        lines = ["| batch | bank | write rule | memory H x Dh | S | K/V cache | base ms/token "
                 "| with memory | overhead | base vs base | floor |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['bank']} | {r['write_rule']}"
                  + (f" (context {r['context_decay']})" if r["context_decay"] else "")
                  + f" | {r['heads']} x "
                  f"{r['head_dim']} | {r['slots']} | "
                  f"{r['kv_dtype']} | "
                  f"{r['base_ms']:.2f} | {r['memory_ms']:.2f} | {100 * r['overhead']:+.1f}% | "
                  f"{100 * r['noise']:.1f}% | "
                  f"{100 * r['floor']:.1f}% |" for r in rows]
        with open(os.path.join(args.out, "llm_overhead.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
