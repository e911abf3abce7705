"""Text into a memory: the write layer's hidden states of a frozen model
(write_layer_hidden), store() of texts into a bank, and the states a
probe or pre-training reads (text_end_states)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import weakref
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from memkernels.hf.attach import attached_handle, find_decoder_layers
from memkernels.memory.bank import MemoryBank, check_same_memory
from memkernels.memory.base import MemoryModel
from memkernels.memory.context import decayed_context
from memkernels.memory.lexical import Entries, WordTable, word_term


class _StopForward(Exception):
    """Raised by the capture hook: the layers after the write layer (and the
    LM head) are not needed to store text."""

    def __init__(self, hidden: Tensor):
        super().__init__()
        self.hidden = hidden


class WriteInputs(NamedTuple):
    """What MemoryModel.write takes from the base model for N texts."""
    hidden: Tensor  # the write layer's hidden states [N, T, hidden] (the token keys)
    values: Optional[Tensor]  # the token values' states (or output embedding rows), or None: `hidden` (values_from)
    # each token's write context [N, T, memory.write_context_width] within its text: the
    # decayed context (context_decay), then the next token's write state (lookahead); or None
    context: Optional[Tensor]


def write_layer_hidden(model: nn.Module, memory: MemoryModel, input_ids: Tensor,
                       attention_mask: Tensor) -> WriteInputs:
    """What a write reads from the base model (WriteInputs): the hidden
    states at the memory's write layer [N, T, hidden] (the copy rule's: the
    LM head's input, where its reads query), and, from the input
    of the first decoder layer, the token values when `config.values_from ==
    "embeddings"` and each token's write context: the decayed context when
    `config.context_decay > 0`, then with `config.append.lookahead` the
    write-layer state of the token after it (zero where none follows).
    Memory reads (if attached) are off; layers after the write layer are skipped."""
    handle = attached_handle(model)
    layers = handle.layers if handle is not None else find_decoder_layers(model)
    target = layers[memory.config.resolved_write_layer]
    values: list[Tensor] = []
    caller = threading.get_ident()  # the hooks act on this call only, not other threads' forwards

    def capture(module, args, output):
        if threading.get_ident() == caller:
            raise _StopForward(output[0] if isinstance(output, tuple) else output)

    def capture_input(module, args, kwargs):
        if threading.get_ident() == caller:
            values.append(args[0] if args else kwargs["hidden_states"])

    config = memory.config
    if getattr(memory, "reads_logits", False):
        # the copy rule keys a token on what the LM head reads there, as its reads query
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ValueError(f"a {type(memory).__name__} keys on the LM head's input, and "
                             f"{type(model).__name__} has none (get_output_embeddings())")
        hooks = [head.register_forward_pre_hook(
            lambda module, args: capture(module, args, args[0]))]
    else:
        hooks = [target.register_forward_hook(capture)]
    if config.values_from == "embeddings" or config.context_decay:
        hooks.append(layers[0].register_forward_pre_hook(capture_input, with_kwargs=True))
    off = handle.reads_disabled() if handle is not None else contextlib.nullcontext()
    try:
        with off:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward as stop:
        parts = []
        if config.context_decay:
            parts.append(decayed_context(values[0], attention_mask, config.context_decay)[0])
        if config.append.lookahead:
            # what follows each token: the state the slot's stored token has
            real = attention_mask.to(stop.hidden.dtype)[..., None]
            parts.append(torch.cat([stop.hidden[:, 1:] * real[:, 1:],
                                    torch.zeros_like(stop.hidden[:, :1])], 1))
        context = torch.cat([p.to(stop.hidden.dtype) for p in parts], -1) if parts else None
        if config.values_from == "output_embeddings":  # the LM head's row of each token
            head = model.get_output_embeddings()
            if head is None or getattr(head, "weight", None) is None:
                raise ValueError(f"values_from='output_embeddings': {type(model).__name__} has "
                                 f"no output embedding (get_output_embeddings() with a weight)")
            token_values = head.weight.detach()[input_ids].to(stop.hidden.dtype)
        else:
            token_values = values[0] if config.values_from == "embeddings" else None
        return WriteInputs(stop.hidden, token_values, context)
    finally:
        for hook in hooks:
            hook.remove()
    raise RuntimeError("the write layer did not run during the forward pass")


@torch.no_grad()
def text_end_states(model: nn.Module, tokenizer, texts: Sequence[str],
                    batch_size: int = 100, every_token: bool = False,
                    context_decay: float = 0.0):
    """[texts, layers + 1, hidden]: the embeddings and every decoder layer's
    output at each text's last token (the base model's: an attached memory's
    reads are off); with every_token, at all tokens of all texts
    [tokens, layers + 1, hidden]. Left-padded batches, positions counted from
    each text's first token, as generate() counts them. With context_decay
    > 0, returns (states, contexts): the decayed context at the same tokens
    [texts or tokens, hidden] (memory.context.decayed_context of the
    embeddings, hidden_states[0], as a reading memory sees it). A text may be
    given as its token ids (a list of ints)."""
    handle = attached_handle(model)
    off = handle.reads_disabled() if handle is not None else contextlib.nullcontext()
    device = next(model.parameters()).device
    out, contexts = [], []
    with off:
        for i in range(0, len(texts), batch_size):
            chunk = [list(t) if isinstance(t, (list, tuple)) else tokenizer(t)["input_ids"]
                     for t in texts[i:i + batch_size]]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                                device=device)
            hidden = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                           output_hidden_states=True, use_cache=False).hidden_states
            hidden = torch.stack(hidden, 2)  # [batch, width, layers + 1, hidden]
            pick = (lambda h: h[mask.bool()]) if every_token else (lambda h: h[:, -1])
            out.append(pick(hidden))
            if context_decay:
                contexts.append(pick(decayed_context(hidden[:, :, 0], mask, context_decay)[0]))
    return (torch.cat(out), torch.cat(contexts)) if context_decay else torch.cat(out)


def _token_ids(item, tokenizer, max_length: Optional[int]) -> list[int]:
    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError("storing text needs a tokenizer (or pass token ids)")
        ids = tokenizer(item)["input_ids"]
    elif isinstance(item, Tensor):
        if item.is_floating_point() or item.is_complex() or item.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {item.dtype}")
        ids = item.reshape(-1).tolist()
    elif isinstance(item, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                  for i in item):
        ids = list(item)
    else:
        raise TypeError(f"each item to store must be a str, a list of token ids or a 1-D "
                        f"tensor of ids, got {type(item).__name__}")
    ids = ids[:max_length] if max_length else ids
    if not ids:
        raise ValueError("an item to store has no tokens")
    return ids


_WORD_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# words the check in word_table must find: plain words only, as every
# tokenizer splits them at their spaces
_WORD_PROBE = "The quick brown fox of Paris jumps over the lazy dog near Zadosox today"


def word_table(tokenizer) -> Optional[WordTable]:
    """The tokenizer's WordTable (how its token ids make words, for the
    lexical index; kept per tokenizer and vocabulary size), or None where it
    cannot decode, or where its words do not come out right on a probe
    sentence (a WordPiece model without its decoder: the index then scores
    token ids). Each id's text is what it adds when decoded after a letter,
    so that a leading space shows whatever the tokenizer's convention
    (byte-level "Ġ", SentencePiece "▁", WordPiece "##")."""
    try:
        size = len(tokenizer)
        kept = _WORD_TABLES.get(tokenizer)
        if kept is not None and kept[0] == size:
            return kept[1]
    except TypeError:  # no len, or not weakly referenceable: built each time
        pass
    try:
        size = len(tokenizer)
        prefix = tokenizer("a", add_special_tokens=False)["input_ids"]
        base = tokenizer.decode(prefix)
        special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                    if getattr(t, "special", False)}
        texts = tokenizer.batch_decode([prefix + [i] for i in range(size)],
                                       clean_up_tokenization_spaces=False)
        probe = tokenizer(_WORD_PROBE, add_special_tokens=False)["input_ids"]
    except Exception:  # a tokenizer-like object without decode: the index scores token ids
        return None
    table = WordTable.from_pieces([None if i in special or not t.startswith(base)
                                   else t[len(base):] for i, t in enumerate(texts)])
    probe_terms = table.terms(torch.tensor(probe, dtype=torch.long),
                              torch.zeros(len(probe), dtype=torch.long))[0]
    if probe_terms.tolist() != [word_term(w) for w in _WORD_PROBE.split()]:
        return None
    with contextlib.suppress(TypeError):
        _WORD_TABLES[tokenizer] = (size, table)
    return table


def _max_positions(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _rows_of_items(items, rows: int) -> list[list]:
    def one_row(x):
        return [x] if isinstance(x, str) or (isinstance(x, Tensor) and x.dim() == 1) else list(x)
    if rows == 1:
        return [one_row(items)]
    if not isinstance(items, (list, tuple)) or len(items) != rows:
        raise ValueError(f"the bank has {rows} rows: items must be a list of {rows} lists "
                         f"(row b's texts are written to row b)")
    return [one_row(x) for x in items]


@torch.no_grad()
def store(memory: MemoryModel, model: nn.Module, tokenizer, items,
          bank: Optional[MemoryBank] = None, *, chunk_size: int = 64,
          max_length: Optional[int] = None, progress: Optional[bool] = None) -> MemoryBank:
    """Writes texts (or token ids) into a bank of `memory` through the frozen `model`.

    items: for a one-row bank, a str, a list of str, or a list of token-id
    lists; for a bank of B rows, a list of B such lists (row b's texts go to
    row b). Every text is encoded on its own (no attention across texts);
    chunk_size texts per row make one write. The write layer's hidden states
    come from the base model (an attached memory's reads are off while
    encoding). Returns the bank (if bank is None, a new one-row bank: under
    the append rule with a slot per stored token, then shrunk to what a
    store gate kept; store more into a bigger one, memory.new_bank(num_slots=...)).
    """
    if not isinstance(memory, MemoryModel):
        raise TypeError(f"memory must be a MemoryModel (a bank to write into goes in bank=), "
                        f"got {type(memory).__name__}")
    if bank is not None:
        check_same_memory(bank, memory, "bank")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise ValueError(f"max_length must be None or an int >= 1, got {max_length!r}")
    rows = _rows_of_items(items, 1 if bank is None else bank.batch_size)
    rows = [[_token_ids(x, tokenizer, max_length) for x in row] for row in rows]
    limit = _max_positions(model)
    longest = max((len(ids) for row in rows for ids in row), default=0)
    if limit is not None and longest > limit:
        raise ValueError(f"a text to store has {longest} tokens, past the model's "
                         f"{limit} positions (max_position_embeddings): pass max_length= to "
                         f"cut texts, or split them")
    fresh = bank is None
    if fresh:  # a fresh bank that takes it all (append rule: a slot per token, shrunk after)
        bank = memory.new_bank(num_slots=memory.slots_to_store(sum(map(len, rows[0]))))
    device = memory.init_bank.device
    n_chunks = max(math.ceil(len(r) / chunk_size) for r in rows)
    bar = tqdm(range(n_chunks), desc="store", unit="chunk",
               disable=(n_chunks < 2) if progress is None else not progress)
    mem = bank.mem
    # A fresh slot-per-token bank fills its empty slots in order, and a write
    # touches all S slots: each chunk writes only the window its tokens can
    # land in, so that storing N texts costs O(N), not O(N^2). `used`: each
    # row's first empty slot; `limit`:
    # where the occupied (null) slots of a fresh bank begin.
    windowed = fresh and memory.slots_to_store(1) is not None
    if windowed:
        occupied = memory.slot_mask(mem)[0]
        limit = int(occupied.nonzero()[0]) if bool(occupied.any()) else mem.shape[2]
        used = torch.zeros(mem.shape[0], dtype=torch.long)
    # a fresh one-row bank keeps which text each slot came from (MemoryBank.entries)
    slot_texts: Optional[list[Tensor]] = [] if windowed and len(rows) == 1 else None
    for c in bar:
        pieces = [r[c * chunk_size:(c + 1) * chunk_size] for r in rows]
        flat = [ids for piece in pieces for ids in piece]
        if not flat:
            continue
        T = max(len(ids) for ids in flat)
        input_ids = torch.zeros(len(flat), T, dtype=torch.long)
        attention = torch.zeros(len(flat), T, dtype=torch.long)
        for n, ids in enumerate(flat):
            input_ids[n, :len(ids)] = torch.tensor(ids)
            attention[n, :len(ids)] = 1
        hidden, value_hidden, context = write_layer_hidden(model, memory, input_ids.to(device),
                                                           attention.to(device))
        # Row b's texts become one token sequence of its write, each text in
        # T + 1 positions: at least one padding position after every text, so
        # that no token's "what follows" (the append rule's content) is the
        # next text's first token.
        span = T + 1
        width = max(len(p) for p in pieces) * span

        def by_row(h: Tensor) -> Tensor:  # [texts, T, C] -> [rows, width, C]
            out = h.new_zeros(len(rows), width, h.shape[-1])
            start = 0
            for b, piece in enumerate(pieces):
                n = len(piece)
                if n:
                    out[b, :n * span].view(n, span, -1)[:, :T] = h[start:start + n]
                start += n
            return out
        row_mask = by_row(attention.to(device).bool()[..., None])[..., 0]
        args = (by_row(hidden), row_mask, None if value_hidden is None else by_row(value_hidden),
                None if context is None else by_row(context))
        if slot_texts is not None:  # the tokens this write stores, in slot order
            stored = memory.stored_tokens(args[0], row_mask)[0].nonzero().flatten().cpu()
            slot_texts.append(c * chunk_size + torch.div(stored, span, rounding_mode="floor"))
        if windowed:
            start = int(used.min())
            end = min(limit, int(used.max()) + int(row_mask.sum(1).max()))
            mem[:, :, start:end] = memory.write(mem[:, :, start:end], *args)
            used = start + memory.slot_mask(mem[:, :, start:end]).sum(1).cpu()
        else:
            mem = memory.write(mem, *args)
    bank.mem = memory.shrink_to_fit(mem) if fresh else mem
    if slot_texts is not None:
        texts = torch.cat(slot_texts) if slot_texts else torch.zeros(0, dtype=torch.long)
        slot_entry = torch.full((bank.num_slots,), -1, dtype=torch.long)
        slot_entry[:texts.numel()] = texts
        entries = Entries.from_texts(rows[0], slot_entry)
        words = None if tokenizer is None else word_table(tokenizer)
        tokens = entries.tokens
        if words is not None and not (tokens.numel() and (int(tokens.min()) < 0 or
                                                           int(tokens.max()) >= words.vocab_size)):
            # (ids past the tokenizer's own have no text to make words of)
            entries = dataclasses.replace(entries, words=words)
        bank.entries = entries
    return bank
