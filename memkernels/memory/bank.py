"""MemoryBank: the run-time content of a memory, one row per user or
sequence; its key/value cache (float, bf16 or int8), its optional index, and
its file format (safetensors with the config, the memory's fingerprint and a
checksum).

A bank knows its memory only through a few methods every write rule
provides (bank_keys_values, slot_mask, config, fingerprint, init_bank), so
this module imports no memory class.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import NamedTuple, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
import safetensors.torch
from torch import Tensor

from memkernels.memory.cache import Versioned, cached
from memkernels.memory.files import atomic_write, tensor_sha256
from memkernels.memory.index import cluster_slots
from memkernels.memory.lexical import (LEXICAL_K, LEXICAL_MAX_DF, LEXICAL_MIN_SCORE_RATIO,
                                       LEXICAL_PAIR_MAX_DF, LEXICAL_PREFER_WHOLE_RUNS, Entries,
                                       LexicalIndex, WordTable)

BANK_FORMAT = "memkernels.bank"
# 2: the checksum covers the metadata too (1: the tensor only; still read)
# 3: the stored texts (MemoryBank.entries) saved beside the bank, in the checksum
# 4: and their tokenizer's word table (Entries.words), when store() had one
BANK_FORMAT_VERSION = 4
ENTRY_TENSORS = ("entry_tokens", "entry_offsets", "slot_entry")
WORD_TABLE_TENSOR = "entry_word_table"
KV_DTYPES = (torch.bfloat16, torch.int8)  # narrow caches beside the memory's own dtype


class Int8Rows(NamedTuple):
    """Bank keys or values cached as int8 with one float32 scale per slot:
    x[..., s, :] ~= scale[..., s] * data[..., s, :] (symmetric, per row of Dh,
    rounding error at most scale / 2 per element). A decode step streams a
    quarter of float32's bytes (plus 4 per slot). Made by
    MemoryBank.keys_values(torch.int8); the fused CPU reading layer reads it
    as is, other paths dequantize it first."""
    data: Tensor   # int8 [..., S, Dh]
    scale: Tensor  # float32 [..., S]

    @staticmethod
    def quantize(x: Tensor) -> "Int8Rows":
        x = x.float()
        scale = x.abs().amax(-1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays 0
        data = torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8)
        return Int8Rows(data.contiguous(), scale.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.data.to(dtype) * self.scale[..., None].to(dtype)


def kernel_operands(keys, values) -> tuple:
    """(keys, values, key_scale, value_scale) as the reading layer op takes them."""
    if isinstance(keys, Int8Rows):
        return keys.data, values.data, keys.scale, values.scale
    return keys, values, None, None


def _tracked(mem: Tensor) -> Tensor:
    """A bank tensor whose in-place changes bump a version counter (which the
    key/value cache checks): an inference tensor (made under
    torch.inference_mode) has none, so it is copied to a normal one."""
    if mem.is_inference():
        with torch.inference_mode(False):
            return mem.clone()
    return mem


class MemoryBank:
    """The content of a memory at run time: [B, H, S, Dh], one row per user or
    sequence (one row = shared by a whole batch).

    Not a parameter: writes replace the tensor (never modify it in place, so
    a failed write leaves the bank as it was). Read keys and values are
    projected once and cached until the next write or parameter update.
    """

    def __init__(self, memory, mem: Tensor):
        c = memory.config
        if mem.dim() != 4 or mem.shape[1] != c.num_heads or mem.shape[3] != c.head_dim:
            raise ValueError(f"bank tensor must be [B, H, S, Dh] with H={c.num_heads}, "
                             f"Dh={c.head_dim}, got {tuple(mem.shape)}")
        self.memory = memory
        self.mem = mem

    @property
    def mem(self) -> Tensor:
        return self._mem

    @mem.setter
    def mem(self, value: Tensor) -> None:
        self._mem = _tracked(value)
        self._kv_cache: Optional[Versioned] = None
        self._mask_cache: Optional[Versioned] = None
        self._index_spec: Optional[tuple[int, Optional[int]]] = getattr(self, "_index_spec", None)
        # reader index -> memoised fused read (memkernels.memory.fused)
        self.fused_plans: dict[object, Versioned] = {}  # memkernels.memory.fused
        # what store() wrote, text by text (memkernels.memory.lexical), valid
        # while the bank is unchanged; the lexical index built from it
        self._entries: Optional[Versioned] = None
        self._lexical: Optional[Versioned] = None
        self._slot_table: Optional[Versioned] = None

    @property
    def batch_size(self) -> int:
        return self._mem.shape[0]

    @property
    def num_slots(self) -> int:
        return self._mem.shape[2]

    def __repr__(self) -> str:
        return (f"MemoryBank(rows={self.batch_size}, heads={self._mem.shape[1]}, "
                f"slots={self.num_slots}, head_dim={self._mem.shape[3]}, dtype={self._mem.dtype}, "
                f"device={self._mem.device})")

    # --- keys and values -------------------------------------------------------------

    def keys_values(self, dtype: Optional[torch.dtype] = None) -> tuple:
        """(keys, values) for memory_read, cached while neither the bank nor
        the projections change. dtype: the cache's dtype (default the bank's;
        torch.bfloat16 halves what a decode step reads; torch.int8 quarters
        it, returned as Int8Rows with a scale per slot). With autograd
        recording and a trainable bank or projection, they are recomputed in
        the bank's dtype so gradients reach them."""
        sources = self.projection_sources()
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return self.memory.bank_keys_values(self._mem)
        return self._cached_keys_values(dtype)[0]

    def projection_sources(self) -> tuple[Tensor, ...]:
        """The tensors the read keys and values are computed from."""
        m = self.memory  # the module dict, not nn.Module.__getattr__: see memory.fused
        return (self._mem, m._parameters["slot_key"], m._parameters["slot_value"])

    def _cached_keys_values(self, dtype: Optional[torch.dtype]) -> tuple:
        """((keys, values), index or None), cached; with an index (build_index)
        the slots come sorted by cluster (a read over all of them is the
        same: a softmax does not depend on the order of its slots)."""
        dtype = dtype or self._mem.dtype
        self._kv_cache = cached(self._kv_cache, self.projection_sources(),
                                lambda: self._project(dtype), (dtype, self._index_spec))
        return self._kv_cache.value

    @torch.no_grad()
    def _project(self, dtype: torch.dtype) -> tuple:
        mem = self._mem
        keys, values = self.memory.bank_keys_values(mem)
        index = None
        if self._index_spec is not None and keys.dim() == 3:  # one row, compacted
            probes, clusters = self._index_spec
            S = keys.shape[1]
            order, centroids, starts = cluster_slots(keys, clusters or max(1, round(math.sqrt(S))))
            keys, values = (torch.gather(t, 1, order[..., None].expand_as(t)).contiguous()
                            for t in (keys, values))
            index = (centroids.to(mem.dtype).contiguous(), starts.cpu().contiguous(), probes)
        if dtype == torch.int8:
            kv = Int8Rows.quantize(keys), Int8Rows.quantize(values)
        else:
            kv = keys.to(dtype), values.to(dtype)
        return kv, index

    def build_index(self, probes: int = 8, clusters: Optional[int] = None) -> "MemoryBank":
        """Approximate reads for a large one-row bank: its keys are clustered
        (spherical k-means per kv head, `clusters` clusters, default sqrt of
        the slots) and each query row reads the slots of its `probes`
        nearest clusters only, not all S (an inverted-file index, as vector
        search does it). Applies to the append and copy rules' fused CPU read, where
        a cosine x 20 read puts nearly all its weight on a few slots; every
        other read stays exact. Rebuilt lazily when the bank or the memory's
        weights change; not saved with the bank, nor carried by clone/stack/
        merge (build it again there). Returns the bank."""
        if self.batch_size != 1:
            raise ValueError(f"build_index: a one-row bank (shared by the batch), this one has "
                             f"{self.batch_size} rows")
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be a positive int, got {probes!r}")
        if clusters is not None and (isinstance(clusters, bool) or not isinstance(clusters, int)
                                     or clusters < 1):
            raise ValueError(f"clusters must be a positive int or None, got {clusters!r}")
        self._index_spec = (probes, clusters)
        self.fused_plans = {}
        return self

    def drop_index(self) -> "MemoryBank":
        """Exact reads again (see build_index)."""
        self._index_spec = None
        self.fused_plans = {}
        return self

    def read_index(self, dtype: Optional[torch.dtype] = None) -> Optional[tuple]:
        """(centroids [Hk, clusters, Dh], cluster_starts [Hk, clusters + 1],
        probes) of the keys keys_values(dtype) returns, or None without an index."""
        return self._cached_keys_values(dtype)[1]

    def slot_mask(self) -> Optional[Tensor]:
        """Which slots reads see, bool [B, S], or None for all of them (the
        memory's rule: slot_mask of the memory), cached until the bank changes."""
        self._mask_cache = cached(self._mask_cache, (self._mem,),
                                  lambda: self.memory.slot_mask(self._mem))
        return self._mask_cache.value

    # --- stored texts: select some, pick them by their words -------------------------

    @property
    def entries(self) -> Optional[Entries]:
        """What store() wrote into this bank, text by text (token ids, and the
        text each slot holds), or None: kept for a fresh one-row bank of a
        slot-per-token rule (append, copy) and dropped by any later change to
        the bank."""
        e = self._entries
        return e.value if e is not None and e.fresh() else None

    @entries.setter
    def entries(self, entries: Optional[Entries]) -> None:
        if entries is not None:
            if self.batch_size != 1:
                raise ValueError(f"entries describe a one-row bank, this one has "
                                 f"{self.batch_size} rows")
            entries.check(self.num_slots)
        self._entries = None if entries is None else Versioned(entries, (self._mem,))
        self._lexical = self._slot_table = None

    def _require_entries(self, what: str) -> Entries:
        entries = self.entries
        if entries is None:
            raise ValueError(f"{what} needs the bank's stored texts, which only a fresh bank "
                             f"that store() filled keeps (one row, the append or copy rule); "
                             f"this bank has none, or was changed since")
        return entries

    def select_entries(self, chosen) -> "MemoryBank":
        """A new one-row bank holding only the stored texts `chosen` (ints,
        indices into entries, in the order given) and the memory's null
        slots: a read over it is the read of a bank that stored only those
        texts (each text is encoded on its own)."""
        entries = self._require_entries("select_entries")
        chosen = torch.as_tensor(chosen, dtype=torch.long).reshape(-1).cpu()
        if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= len(entries)):
            raise ValueError(f"chosen: text indices in [0, {len(entries)}), got "
                             f"{chosen.tolist()[:8]}")
        if chosen.unique().numel() != chosen.numel():
            raise ValueError("chosen: each text at most once")
        by_text, starts, others = self._slots_by_text(entries)
        # texts in the order chosen, each text's slots in their stored order
        keep = [by_text[starts[e]:starts[e + 1]] for e in chosen.tolist()]
        order = torch.cat([*keep, others]).to(self._mem.device)
        bank = MemoryBank(self.memory, self._mem.detach()[:, :, order].clone())
        bank.entries = entries.subset(chosen, order.cpu())
        return bank

    def _slots_by_text(self, entries: Entries) -> tuple:
        """(the written slots grouped by text, in stored order; where text e's
        group starts, [E + 1]; the other occupied slots: the nulls), cached
        while the bank is unchanged: a selection then costs its own slots."""
        def build():
            slot_entry = entries.slot_entry
            written = (slot_entry >= 0).nonzero().flatten()
            by_text = written[torch.sort(slot_entry[written], stable=True).indices]
            starts = torch.zeros(len(entries) + 1, dtype=torch.long)
            starts[1:] = torch.bincount(slot_entry[written], minlength=len(entries)).cumsum(0)
            occupied = self.slot_mask()
            others = ((slot_entry < 0) & occupied[0].cpu()).nonzero().flatten() \
                if occupied is not None else torch.zeros(0, dtype=torch.long)
            return by_text, starts.tolist(), others
        self._slot_table = cached(self._slot_table, (self._mem,), build)
        return self._slot_table.value

    def lexical_choice(self, query_ids, k: int = LEXICAL_K,
                       min_score_ratio: float = LEXICAL_MIN_SCORE_RATIO,
                       max_df: float = LEXICAL_MAX_DF,
                       pair_max_df: float = LEXICAL_PAIR_MAX_DF,
                       prefer_whole_runs: bool = LEXICAL_PREFER_WHOLE_RUNS,
                       run_max_df: float = LEXICAL_MAX_DF) -> Tensor:
        """The indices (into entries, best first) of the stored texts that best
        match `query_ids` (the question's token ids, same tokenizer) by BM25:
        at most k, those scoring at least min_score_ratio x the best; empty
        when the question shares no term with any stored text. Question terms
        that more than max_df of the texts hold (and more than 10) do not
        count: the words of a phrasing many facts share outweigh the one
        word that names the relation (1.0: every term counts). With the
        tokenizer's words, a pair of consecutive words counts while both are
        in at most pair_max_df of the texts, and prefer_whole_runs keeps, of
        the texts chosen, those where the question's names stand whole ("Gina
        Barros" is not "Beatrice Gina Barros": LexicalIndex.top); a name is
        a run of words each in at most run_max_df of the texts. The index is
        built on the first call and kept while the bank and run_max_df are
        unchanged."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if isinstance(min_score_ratio, bool) or not isinstance(min_score_ratio, (int, float)) \
                or not 0.0 <= min_score_ratio <= 1.0:
            raise ValueError(f"min_score_ratio must be a number in [0, 1], got {min_score_ratio!r}")
        if isinstance(max_df, bool) or not isinstance(max_df, (int, float)) \
                or not 0.0 < max_df <= 1.0:
            raise ValueError(f"max_df must be a number in (0, 1], got {max_df!r}")
        if isinstance(pair_max_df, bool) or not isinstance(pair_max_df, (int, float)) \
                or not 0.0 < pair_max_df <= 1.0:
            raise ValueError(f"pair_max_df must be a number in (0, 1], got {pair_max_df!r}")
        if not isinstance(prefer_whole_runs, bool):
            raise ValueError(f"prefer_whole_runs must be a bool, got {prefer_whole_runs!r}")
        if isinstance(run_max_df, bool) or not isinstance(run_max_df, (int, float)) \
                or not 0.0 < run_max_df <= 1.0:
            raise ValueError(f"run_max_df must be a number in (0, 1], got {run_max_df!r}")
        if isinstance(query_ids, Tensor):
            query_ids = query_ids.reshape(-1).tolist()
        if isinstance(query_ids, str) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                 for t in query_ids):
            raise TypeError("query_ids must be the question's token ids (a list of ints or an "
                            "int tensor), not text: tokenize it with the model's tokenizer")
        entries = self._require_entries("lexical_choice")
        self._lexical = cached(self._lexical, (self._mem,),
                               lambda: LexicalIndex(entries, run_max_df=float(run_max_df)),
                               key=(float(run_max_df),))
        return self._lexical.value.top(query_ids, k, float(min_score_ratio), float(max_df),
                                       float(pair_max_df), prefer_whole_runs)

    def lexical_select(self, query_ids, k: int = LEXICAL_K,
                       min_score_ratio: float = LEXICAL_MIN_SCORE_RATIO,
                       max_df: float = LEXICAL_MAX_DF,
                       pair_max_df: float = LEXICAL_PAIR_MAX_DF,
                       prefer_whole_runs: bool = LEXICAL_PREFER_WHOLE_RUNS,
                       run_max_df: float = LEXICAL_MAX_DF) -> "MemoryBank":
        """select_entries of lexical_choice: a sparse index in front of the
        dense read, for banks of many texts. The best text and its near ties
        (several facts about the question's subject score alike: the dense
        read tells them apart; a clear winner is read alone, as more
        candidates confuse the read). Defaults chosen on the dev phrasings
        (docs/performance.md). A question that shares no term with any stored
        text gets the whole bank back (the dense read over everything), not
        an arbitrary text."""
        chosen = self.lexical_choice(query_ids, k, min_score_ratio, max_df, pair_max_df,
                                     prefer_whole_runs, run_max_df)
        return self.select_entries(chosen) if chosen.numel() else self

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle: the fused reads' plans hold C++ objects (rebuilt on use)
        return {**self.__dict__, "fused_plans": {}}

    # --- rows ------------------------------------------------------------------------

    def clone(self) -> "MemoryBank":
        bank = MemoryBank(self.memory, self._mem.detach().clone())
        bank.entries = self.entries
        return bank

    def row(self, index: int) -> "MemoryBank":
        """Row `index` as a one-row bank (a copy)."""
        bank = MemoryBank(self.memory, self._mem[index:index + 1].detach().clone())
        if self.batch_size == 1:
            bank.entries = self.entries
        return bank

    @staticmethod
    def stack(banks: Sequence["MemoryBank"]) -> "MemoryBank":
        """One batched bank from several (row order kept): each sequence of a
        batch reads its own bank."""
        _check_compatible(banks, "stack")
        return MemoryBank(banks[0].memory, torch.cat([b.mem.detach() for b in banks], dim=0))

    @staticmethod
    def merge(a: "MemoryBank", b: "MemoryBank") -> "MemoryBank":
        """Joins two banks by concatenating their slots (S_a + S_b): reads see
        what either bank holds, without retraining. Write queries come from
        slot content, so the merged bank can be written to as well."""
        _check_compatible((a, b), "merge")
        if a.batch_size != b.batch_size:
            raise ValueError(f"merge needs banks with as many rows, got {a.batch_size} and "
                             f"{b.batch_size}")
        return MemoryBank(a.memory, torch.cat([a.mem.detach(), b.mem.detach()], dim=2))

    # --- persistence -------------------------------------------------------------------

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Saves the bank as safetensors with its config, the memory's
        fingerprint and a checksum; written to a temporary file and renamed,
        so `path` is never half-written."""
        mem = self._mem.detach().cpu().contiguous()
        entries = self.entries
        # the oldest format that holds what there is to save: older readers read it
        version = 2 if entries is None else 3 if entries.words is None else 4
        metadata = {
            "format": BANK_FORMAT, "format_version": str(version),
            "config": json.dumps(self.memory.config.to_dict(), sort_keys=True),
            "memory_fingerprint": self.memory.fingerprint(),
        }
        tensors = {"mem": mem}
        if entries is not None:
            tensors.update(zip(ENTRY_TENSORS, (entries.tokens.contiguous(),
                                               entries.offsets.contiguous(),
                                               entries.slot_entry.contiguous())))
            if entries.words is not None:
                tensors[WORD_TABLE_TENSOR] = entries.words.table.contiguous()
        metadata["sha256"] = _checksum(mem, metadata, [tensors.get(k) for k in
                                                       ENTRY_TENSORS + (WORD_TABLE_TENSOR,)])
        atomic_write(os.fspath(path),
                     lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], memory, *, strict: bool = True) -> "MemoryBank":
        """Loads a bank saved by save() for use with `memory`.

        Raises ValueError when the file is not a bank, has another format
        version, is corrupt (checksum), or was made for a memory of other
        sizes; with strict=True also when it was made with other trained
        parameters (memory fingerprint). The bank goes to the memory's device
        and dtype.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no memory bank file at {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                mem = f.get_tensor("mem") if "mem" in f.keys() else None
                stored = [f.get_tensor(k) if k in f.keys() else None for k in ENTRY_TENSORS]
                word_table = (f.get_tensor(WORD_TABLE_TENSOR)
                              if WORD_TABLE_TENSOR in f.keys() else None)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path!r} is not a readable safetensors file (corrupt or "
                             f"truncated?): {exc}") from exc
        if meta.get("format") != BANK_FORMAT:
            raise ValueError(f"{path!r} is not a memkernels bank (format "
                             f"{meta.get('format')!r}, expected {BANK_FORMAT!r})")
        if mem is None:
            raise ValueError(f"{path!r} has no 'mem' tensor: not a complete memkernels bank")
        version = meta.get("format_version")
        if version not in [str(v) for v in range(1, BANK_FORMAT_VERSION + 1)]:
            raise ValueError(f"{path!r} has bank format version {version}, this memkernels "
                             f"reads versions 1 to {BANK_FORMAT_VERSION}")
        if any(t is not None for t in stored) and not all(t is not None for t in stored):
            raise ValueError(f"{path!r} is corrupt: it has some of the stored-text tensors "
                             f"{ENTRY_TENSORS}, not all")
        if word_table is not None and stored[0] is None:
            raise ValueError(f"{path!r} is corrupt: it has a word table ({WORD_TABLE_TENSOR}) "
                             f"but no stored texts")
        if meta.get("sha256") != _checksum(mem, meta if version != "1" else None,
                                           stored + [word_table]):
            raise ValueError(f"{path!r} is corrupt: its content does not match its checksum")
        try:
            saved = json.loads(meta.get("config", "{}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path!r} has an unreadable config entry: {exc}") from exc
        if not isinstance(saved, dict):
            raise ValueError(f"{path!r}: its config entry must be a JSON object, got "
                             f"{type(saved).__name__}")
        ours = memory.config.to_dict()
        for key in ("hidden_size", "num_heads", "head_dim", "write_rule"):
            theirs = saved.get(key, "blend" if key == "write_rule" else None)
            if theirs != ours[key]:  # checked with strict=False too: another rule's bank is noise
                raise ValueError(f"{path!r} was saved for a memory with {key}={theirs!r}, this "
                                 f"memory has {key}={ours[key]!r}")
        if strict and meta.get("memory_fingerprint") != memory.fingerprint():
            raise ValueError(f"{path!r} was written by a memory with other trained parameters "
                             f"(fingerprint {meta.get('memory_fingerprint')} != "
                             f"{memory.fingerprint()}); pass strict=False to load it anyway")
        if not mem.is_floating_point():
            raise ValueError(f"{path!r}: the bank must be a floating-point tensor, got {mem.dtype}")
        if mem.dim() != 4 or 0 in mem.shape:
            raise ValueError(f"{path!r}: the bank must be a non-empty [B, H, S, Dh] tensor, got "
                             f"shape {tuple(mem.shape)}")
        p = memory.init_bank
        bank = cls(memory, mem.to(device=p.device, dtype=p.dtype))
        if stored[0] is not None:
            try:
                bank.entries = Entries(*stored, None if word_table is None
                                       else WordTable(word_table))
            except ValueError as exc:
                raise ValueError(f"{path!r}: its stored texts do not fit its bank: {exc}") from exc
        return bank


def _checksum(mem: Tensor, metadata: Optional[dict],
              entry_tensors: Sequence[Optional[Tensor]] = ()) -> str:
    """SHA-256 of the bank's content, (format 2 on) of its metadata and
    (format 3 on, when saved) of its stored texts."""
    digest = tensor_sha256(mem)
    for t in entry_tensors:
        if t is not None:
            digest = hashlib.sha256((digest + tensor_sha256(t)).encode()).hexdigest()
    if metadata is None:
        return digest
    covered = {k: metadata.get(k) for k in ("format", "format_version", "config",
                                            "memory_fingerprint")}
    return hashlib.sha256((digest + json.dumps(covered, sort_keys=True)).encode()).hexdigest()


def check_same_memory(bank: "MemoryBank", memory, what: str) -> None:
    """Raises unless `bank` belongs to `memory` (the same object, or one with
    the same config and trained parameters: the same fingerprint)."""
    if not isinstance(bank, MemoryBank):
        raise TypeError(f"{what} must be a MemoryBank, got {type(bank).__name__}")
    if bank.memory is not memory and bank.memory.fingerprint() != memory.fingerprint():
        raise ValueError(f"{what} belongs to another memory (other config or trained "
                         f"parameters): its content means nothing to this one")


def _check_compatible(banks: Sequence[MemoryBank], what: str) -> None:
    if not banks:
        raise ValueError(f"{what} needs at least one bank")
    first = banks[0]
    for b in banks[1:]:
        if b.memory is not first.memory and b.memory.fingerprint() != first.memory.fingerprint():
            raise ValueError(f"{what}: banks belong to different memories")
        if b.mem.shape[1] != first.mem.shape[1] or b.mem.shape[3] != first.mem.shape[3]:
            raise ValueError(f"{what}: banks have different heads/head_dim: "
                             f"{tuple(first.mem.shape)} vs {tuple(b.mem.shape)}")
        if what == "stack" and b.num_slots != first.num_slots:
            raise ValueError(f"stack needs banks with as many slots, got {first.num_slots} and "
                             f"{b.num_slots}")
        if b.mem.dtype != first.mem.dtype or b.mem.device != first.mem.device:
            raise ValueError(f"{what}: banks differ in dtype/device: {first.mem.dtype}/"
                             f"{first.mem.device} vs {b.mem.dtype}/{b.mem.device}")
