"""Experiment (not product code): a written memory whose slots hold an address
and a content, trained with an optional contrastive loss that ties each
question's read query to its statement's address. Figures and what they mean:
benchmarks/NOTES.md, "Session 4" to "Session 7".

    python benchmarks/experiments/address_split.py --steps 1500 --facts 16 --aux 1.0
    python benchmarks/experiments/address_split.py --mlp --aux 5.0 --aux-temperature 0.05 \
        --pretrain-address 2000     # session 5: MLP query/address, pre-fitted
    python benchmarks/experiments/address_split.py --mlp --allocate --aux 0 \
        --pretrain-address 2000     # session 6: each written token in its own slot
    python benchmarks/experiments/address_split.py --mlp --allocate --cosine-read 20 \
        --aux 5.0 --aux-temperature 0.05 --pretrain-address 6000 \
        --pretrain-negatives all --save mem.pt   # session 7: N=100 80% (NOTES.md)
    python benchmarks/experiments/address_split.py --mlp --allocate --cosine-read 20 \
        --load mem.pt --eval-slots 12288 --eval-facts 1000   # the same memory at N=1000

The bank gets 2H heads: heads [0, H) hold a slot's address, written from the
write layer at token t (who/what the context is about); heads [H, 2H) hold its
content, written from the embedding of token t+1 (what came next). Both halves
share one write attention (same slot queries, from the address half, and the
same token keys, centred per write), so address and content come from the same
tokens; read keys come from the address half, values from the content half
(the reader's 2H query heads read the H pairs twice). With --aux > 0 the loss
adds aux x cross-entropy of each question's read query (first reader, answer
position) against the addresses at every statement's pre-object token in the
batch (its own statement is the target).
"""
import argparse
import math
import random
import time
import types

import torch
import torch.nn.functional as F

import memkernels
from memkernels import MemoryBank, MemoryConfig, MemoryModel
from memkernels.integration import find_decoder_layers, write_layer_hidden
from memkernels.ops import memory_write
from memkernels.recall import base_lm, benchmark, probe, tasks
from memkernels.recall.facts import make_facts, qa_prompt


NULL_SLOTS = 8  # --allocate: initial slots every read keeps (the "nothing stored" answer)


class AddressContentMemory(MemoryModel):
    """Bank heads [0, H): addresses; [H, 2H): contents (see the module docstring)."""

    def bank_keys_values(self, mem):
        H = self.config.num_heads // 2
        k = torch.einsum("bhsd,hde->bhse", mem[:, :H], self.slot_key[:H])
        v = torch.einsum("bhsd,hde->bhse", mem[:, H:], self.slot_value[H:])
        keys, values = torch.cat([k, k], 1), torch.cat([v, v], 1)
        if mem.shape[0] == 1:
            keys, values = keys[0], values[0]
        return keys.to(mem.dtype).contiguous(), values.to(mem.dtype).contiguous()

    def addresses(self, hidden):
        """[B, T, H, D]: what each token writes into the address half (through
        address_mlp when there is one: see --mlp)."""
        B, T, _ = hidden.shape
        H2, D = self.config.num_heads, self.config.head_dim
        x = self.write_norm(hidden)
        if hasattr(self, "address_mlp"):
            return self.address_mlp(x).view(B, T, H2 // 2, D)
        return self.token_value(x).view(B, T, H2, D)[:, :, :H2 // 2]

    def read(self, reader_index, hidden, bank, kv_dtype=None):
        if not hasattr(self, "address_mlp"):
            return super().read(reader_index, hidden, bank, kv_dtype)
        keys, values = bank.keys_values()  # no fused path: the query is an MLP
        return self.readers[reader_index](hidden, keys, values)

    def write(self, mem, hidden, token_mask=None, value_hidden=None):
        if getattr(self, "allocate", False):
            return self.allocate_write(mem, hidden, token_mask, value_hidden)
        B, T, _ = hidden.shape
        H2, D = self.config.num_heads, self.config.head_dim
        H = H2 // 2
        x, xv = self.write_norm(hidden), self.write_norm(value_hidden)
        xv_next = torch.cat([xv[:, 1:], torch.zeros_like(xv[:, :1])], 1)
        k = self.token_key(x).view(B, T, H2, D).transpose(1, 2)[:, :H]
        m = token_mask[:, None, :, None].to(k.dtype)
        k = k - (k * m).sum(2, keepdim=True) / m.sum(2, keepdim=True).clamp(min=1)  # centred
        address = self.addresses(hidden).transpose(1, 2)
        content = self.token_value(xv_next).view(B, T, H2, D).transpose(1, 2)[:, H:]
        q = torch.einsum("bhsd,hde->bhse", mem[:, :H], self.slot_query[:H])
        f = (torch.einsum("bhsd,hd->bhs", mem[:, :H], self.forget[:H])
             + self.forget_bias[:H, None])[..., None]
        i = (torch.einsum("bhsd,hd->bhs", mem[:, :H], self.input[:H])
             + self.input_bias[:H, None])[..., None]
        both = lambda t: torch.cat([t, t], 1).contiguous()  # noqa: E731 (one attention, two halves)
        return memory_write(mem, both(q), both(k), torch.cat([address, content], 1).contiguous(),
                            both(f), both(i), token_mask=token_mask)


    def allocate_write(self, mem, hidden, token_mask, value_hidden):
        """--allocate: no write attention; the n real tokens of a row take
        slots [0, n) in order (slot j: tanh(address of token j), tanh(content
        of token j + 1)), the other slots keep `mem` (a fresh bank: the
        learned initial slots). The write that cannot blur facts together: it
        bounds what a learned allocation (a usage-ranked slot per selected
        token) could reach; a bank holds at most S tokens, and a second write
        starts again at slot 0."""
        B, T, _ = hidden.shape
        S, H = mem.shape[2], self.config.num_heads // 2
        real = token_mask.sum(1)
        if int(real.max()) > S:
            raise ValueError(f"--allocate: {int(real.max())} tokens do not fit {S} slots")
        xv = self.write_norm(value_hidden)
        xv_next = torch.cat([xv[:, 1:], torch.zeros_like(xv[:, :1])], 1)
        content = self.token_value(xv_next).view(B, T, 2 * H, -1)[:, :, H:]
        tokens = torch.cat([torch.tanh(self.addresses(hidden)), torch.tanh(content)], 2)
        order = torch.sort((~token_mask).to(torch.int8), dim=1, stable=True).indices
        tokens = tokens.gather(1, order[:, :, None, None].expand_as(tokens))  # real tokens first
        tokens = F.pad(tokens, (0, 0, 0, 0, 0, max(0, S - T)))[:, :S].transpose(1, 2)
        slot = torch.arange(S, device=mem.device)[None, :]
        used = slot < real[:, None]
        # the reads after this write see the written slots and NULL_SLOTS learned
        # defaults; without the mask, ~1000 initial slots drown the 10-50 written
        # (an unchanged lm loss of 1.56 over 500 steps)
        self.slot_mask = used | (slot >= S - NULL_SLOTS)
        return torch.where(used[:, None, :, None], tokens.to(mem.dtype), mem)


class Standardize(torch.nn.Module):
    """x -> (x - mean) / std per feature, the statistics taken from the first
    batch seen and then fixed: the hidden states share a large mean direction
    that an RMS norm keeps (the probe's MLPs centre and scale their inputs)."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.fitted = False

    def forward(self, x):
        if not self.fitted:
            flat = x.detach().reshape(-1, x.shape[-1])
            self.mean.copy_(flat.mean(0))
            self.std.copy_(flat.std(0) + 1e-6)
            self.fitted = True
        return (x - self.mean) / self.std


def address_keys(memory, hidden):
    """[B, T, H, D]: the read key a slot would have if it held only this token's address."""
    H = memory.config.num_heads // 2
    return torch.einsum("bthd,hde->bthe", torch.tanh(memory.addresses(hidden)),
                        memory.slot_key[:H])


def read_queries(memory, hidden):
    """[B, T, H, D]: the first reader's queries on the address heads."""
    B, T, _ = hidden.shape
    reader, H2 = memory.readers[0], memory.config.num_heads
    return reader.query(reader.norm(hidden)).view(B, T, H2, -1)[:, :, :H2 // 2]


def contrastive(anchors, candidates, targets, temperature):
    """Cross-entropy of each anchor against all candidates, its target the right one:
    cosine over all heads / temperature when temperature > 0, else scaled dots."""
    if temperature > 0:
        scores = (F.normalize(anchors.flatten(1), dim=-1)
                  @ F.normalize(candidates.flatten(1), dim=-1).T) / temperature
    else:
        scores = torch.einsum("ahd,chd->ac", anchors, candidates) / math.sqrt(anchors[0].numel())
    return F.cross_entropy(scores, targets)


def read_nll(q, keys, targets, scale: float, valid=None):
    """-log of the weight the read puts on each target slot, in the read's own
    geometry (--cosine-read: cosine x scale per head, softmax per head over
    the slots, weights averaged over heads, as read_hits measures it).
    q [A, H, D], keys [K, H, D], targets [A] (indices into K), valid [K] bool."""
    scores = torch.einsum("ahd,khd->ahk", F.normalize(q, dim=-1), F.normalize(keys, dim=-1))
    scores = scores * scale
    if valid is not None:
        scores = scores.masked_fill(~valid[None, None, :], float("-inf"))
    # the target's log-weight per head, then averaged over heads in log space
    # (gathered first: a logsumexp over masked, all -inf columns has NaN gradients)
    per_head = scores.log_softmax(-1).gather(2, targets[:, None, None].expand(-1, q.shape[1], 1))
    return -(torch.logsumexp(per_head[..., 0], dim=1) - math.log(q.shape[1])).mean()


def statement_token_states(model, tok, memory, texts: list[str]) -> list[torch.Tensor]:
    """Each text's write-layer states, every token ([len, C] per text): what a
    store() of the text writes from (each statement is its own row there)."""
    out = []
    for i in range(0, len(texts), 100):
        ids = [tok(t)["input_ids"] for t in texts[i:i + 100]]
        width = max(map(len, ids))
        batch = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        with torch.no_grad():
            hidden, *_ = write_layer_hidden(model, memory, batch, mask)
        out += [hidden[r, :len(x)] for r, x in enumerate(ids)]
    return out


def pretrain_address_all_tokens(memory, model, tok, steps: int, scale: float,
                                facts: int = 8000, batch: int = 256):
    """--pretrain-negatives all: as pretrain_address, but each question competes
    for its statement's pre-object token against every token of the batch's
    statements (what the read meets in an allocated bank: all written tokens,
    the asked statement's own subject and verb among them), scored as the read
    scores (read_nll)."""
    rng = random.Random(11)
    pairs = make_facts(facts, seed=11, split="train")[0]
    layer = memory.config.resolved_write_layer + 1
    q_states = probe.text_end_states(model, tok, [qa_prompt(f.question(rng)) for f in pairs])
    q_states = q_states[:, layer, None]
    statements = [f.statement(rng) for f in pairs]
    tokens = statement_token_states(model, tok, memory, statements)
    pre = [len(tok(t.rsplit(f.object, 1)[0].rstrip())["input_ids"]) - 1
           for t, f in zip(statements, pairs)]
    params = [*memory.address_mlp.parameters(), *memory.readers[0].query.parameters(),
              memory.slot_key]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    for step in range(steps):
        rows = torch.randperm(facts)[:batch].tolist()
        cand = torch.cat([tokens[r] for r in rows])[None]  # [1, K, C]
        starts = torch.tensor([0] + [len(tokens[r]) for r in rows[:-1]]).cumsum(0)
        targets = starts + torch.tensor([pre[r] for r in rows])
        loss = read_nll(read_queries(memory, q_states[rows])[:, 0],
                        address_keys(memory, cand)[0], targets, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"address pre-training (all tokens) step {step}: loss {loss.item():.3f}",
                  flush=True)


def pretrain_address(memory, model, tok, steps: int, temperature: float, facts: int = 8000):
    """Fits the address MLP, the first reader's query MLP and the address heads'
    slot keys on (question, statement) pairs of train-split facts alone, as the
    probe's --address-ceiling MLPs (which find the statement 91% of the time at
    N=100): InfoNCE over batches of 512. Run before the memory is attached (the
    states are the base LM's)."""
    rng = random.Random(11)
    pairs = make_facts(facts, seed=11, split="train")[0]
    layer = memory.config.resolved_write_layer + 1  # hidden_states index of its output
    q_states = probe.text_end_states(model, tok, [qa_prompt(f.question(rng)) for f in pairs])
    s_states = probe.text_end_states(model, tok, [f.statement(rng).rsplit(f.object, 1)[0].rstrip()
                                                  for f in pairs])
    q_states, s_states = q_states[:, layer, None], s_states[:, layer, None]  # [facts, 1, C]
    params = [*memory.address_mlp.parameters(), *memory.readers[0].query.parameters(),
              memory.slot_key]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    for step in range(steps):
        rows = torch.randint(0, facts, (512,))
        loss = contrastive(read_queries(memory, q_states[rows])[:, 0],
                           address_keys(memory, s_states[rows])[:, 0], torch.arange(512),
                           temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"address pre-training step {step}: loss {loss.item():.3f}", flush=True)


def read_geometry(reader, q, keys):
    """(q, keys, scale) as the read scores them: scaled dots, or with
    --cosine-read C, cosine x C per head (the pre-training's InfoNCE geometry)."""
    cosine = getattr(reader, "cosine_scale", 0.0)
    if not cosine:
        return q, keys, None
    return F.normalize(q, dim=-1), F.normalize(keys, dim=-1).contiguous(), cosine


def mlp_reader_forward(self, hidden, keys, values):
    """MemoryReader.forward without the inference fast path (which folds a
    linear query projection): the query may be any module."""
    B, T, _ = hidden.shape
    q = self.query(self.norm(hidden)).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
    q, keys, scale = read_geometry(self, q, keys)
    slot_mask = getattr(self, "slot_mask_of", lambda: None)()
    if slot_mask is not None and slot_mask.shape[0] != B:
        slot_mask = slot_mask.expand(B, -1)  # one stored bank read by a batch of questions
    read = memkernels.memory_read(q.to(keys.dtype).contiguous(), keys, values, scale=scale,
                                  slot_mask=slot_mask, backend=self.backend).to(hidden.dtype)
    return hidden + torch.tanh(self.gate) * self.out(read.transpose(1, 2).reshape(B, T, -1))


def read_hits(memory, model, tok, facts, read_layer_output, seed: int = 0) -> dict:
    """--allocate only: stores the facts' statements, then asks each question
    and looks at the first reader's attention (address heads, summed over
    heads) at the answer position: how often its largest weight is on the
    asked statement's pre-object slot, and the mean weight there. Tells a
    failed address (the read looks elsewhere) from a failed content (it finds
    the slot, the answer is still wrong)."""
    rng = random.Random(seed)
    statements = [f.statement(rng) for f in facts]
    heads = [tok(t.rsplit(f.object, 1)[0].rstrip())["input_ids"] for t, f in zip(statements, facts)]
    lengths = [len(tok(t)["input_ids"]) for t in statements]
    starts = [sum(lengths[:j]) for j in range(len(facts))]
    target = torch.tensor([starts[j] + len(heads[j]) - 1 for j in range(len(facts))])
    bank = memory.store(model, tok, statements, chunk_size=len(statements), progress=False)
    keys, _ = bank.keys_values()  # [2H, S, D]: address keys, twice
    H = memory.config.num_heads // 2
    prompts = [tok(qa_prompt(f.question(rng)))["input_ids"] for f in facts]
    hits, mass = 0, 0.0
    handle = memkernels.attach(model, memory, bank)
    try:
        with torch.no_grad():
            for j, ids in enumerate(prompts):
                model(input_ids=torch.tensor([ids]))
                q = read_queries(memory, read_layer_output["h"])[0, -1]  # [H, D]
                q, k, scale = read_geometry(memory.readers[0], q, keys[:H])
                scores = torch.einsum("hd,hsd->hs", q, k) * (scale or q.shape[-1] ** -0.5)
                scores = scores.masked_fill(~memory.slot_mask[0], float("-inf"))
                weights = scores.softmax(-1).sum(0) / H
                hits += int(weights.argmax() == target[j])
                mass += weights[target[j]].item()
    finally:
        handle.detach()
    return dict(hit=hits / len(facts), mass=mass / len(facts))


def grow_bank(memory, slots: int) -> None:
    """--eval-slots: a bank of `slots` slots whose last NULL_SLOTS are the
    trained defaults (allocate_write fills the others and masks the rest)."""
    old = memory.init_bank.data
    new = torch.zeros(old.shape[0], slots, old.shape[2], dtype=old.dtype)
    new[:, -NULL_SLOTS:] = old[:, -NULL_SLOTS:]
    memory.init_bank = torch.nn.Parameter(new)


def make_batch(tok, step: int, facts_hi: int, curriculum: int, rows: int = 8,
               questions: int = 8, seed: int = 1):
    """Written episodes as tasks.written_batches makes them, plus each
    statement's pre-object position and each question's answer position."""
    rng = random.Random(hash((seed, step)))
    top = facts_hi if step >= curriculum else max(1, round(facts_hi ** (step / curriculum)))
    lm_rows, writes, pre_object, asked = [], [], [], []
    first_scored = lambda labels: next(i for i, lab in enumerate(labels) if lab != -100)  # noqa: E731
    for _ in range(rows):
        facts = [tasks.random_fact(rng) for _ in range(rng.randint(min(4, top), top))]
        statements = [tasks.statement_tokens(tok, f, rng) for f in facts]
        writes.append([ids for ids, _ in statements])
        pre_object.append([first_scored(labels) - 1 for _, labels in statements])
        ids, labels, asks = [], [], []
        for j in rng.sample(range(len(facts)), min(questions, len(facts))):
            q_ids, q_labels = tasks.qa_tokens(tok, facts[j], rng, follows=bool(ids))
            asks.append((len(ids) + first_scored(q_labels) - 1, j))
            ids, labels = ids + q_ids, labels + q_labels
        lm_rows.append((ids, labels))
        asked.append(asks)
    batch = tasks._lm_batch(lm_rows, tok.pad_token_id)
    n, tw = max(len(w) for w in writes), max(len(t) for w in writes for t in w)
    write_ids = torch.full((rows, n, tw), tok.pad_token_id)
    write_mask = torch.zeros(rows, n, tw, dtype=torch.long)
    for r, w in enumerate(writes):
        for j, t in enumerate(w):
            write_ids[r, j, :len(t)] = torch.tensor(t)
            write_mask[r, j, :len(t)] = 1
    return batch, write_ids, write_mask, pre_object, asked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--facts", type=int, default=16, help="most facts per episode")
    ap.add_argument("--curriculum", type=int, default=1000, help="steps from 1 to --facts")
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the contrastive loss")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--heads", type=int, default=4, help="heads per half (x 32 dims)")
    ap.add_argument("--mlp", action="store_true",
                    help="read queries and written addresses through 2-layer MLPs (the probe's "
                         "--address-ceiling: a linear address finds the statement 33%% of the "
                         "time at N=100, MLPs 91%%)")
    ap.add_argument("--aux-temperature", type=float, default=0.0,
                    help="> 0: the contrastive loss on cosine similarity / this (else scaled dots)")
    ap.add_argument("--pretrain-address", type=int, default=0, metavar="STEPS",
                    help="with --mlp: first fit the address/query MLPs alone (see pretrain_address)")
    ap.add_argument("--allocate", action="store_true",
                    help="each written token in its own slot (see allocate_write)")
    ap.add_argument("--cosine-read", type=float, default=0.0, metavar="C",
                    help="with --mlp: the read scores cosine x C per head (else q.k / sqrt(Dh))")
    ap.add_argument("--pretrain-negatives", choices=["statements", "all"], default="statements",
                    help="all: pre-train against every written token, in the read's geometry "
                         "(needs --cosine-read and --allocate)")
    ap.add_argument("--aux-negatives", choices=["statements", "all"], default="statements",
                    help="all: the --aux loss against every token written in the row, in the "
                         "read's geometry (needs --cosine-read and --allocate)")
    ap.add_argument("--eval-facts", type=int, nargs="+", default=[10, 32, 100])
    ap.add_argument("--freeze-address", action="store_true",
                    help="with --pretrain-address: the pre-trained address/query parameters stay "
                         "fixed in the joint training (else they move at lr / 10)")
    ap.add_argument("--eval-seed", type=int, default=0, help="which facts are evaluated")
    ap.add_argument("--seed", type=int, default=0, help="the training run's seed (init, episodes)")
    ap.add_argument("--distractors", action="store_true",
                    help="evaluate with as many distractor facts stored (similar names, other "
                         "objects) as asked ones")
    ap.add_argument("--save", metavar="FILE", help="save the trained memory's state_dict here")
    ap.add_argument("--load", metavar="FILE",
                    help="skip training: load a state_dict saved by --save (same flags)")
    ap.add_argument("--eval-slots", type=int, default=0,
                    help="with --allocate: evaluate with a bank of this many slots (the trained "
                         "defaults kept), so that N=1000 facts (~10k tokens) fit")
    args = ap.parse_args()
    if args.allocate and not args.mlp:
        ap.error("--allocate needs --mlp (its reads take the slot mask in mlp_reader_forward)")
    model, tok = base_lm.load()
    torch.manual_seed(args.seed)
    nl = model.config.num_hidden_layers
    config = MemoryConfig.from_hf(model.config, num_heads=2 * args.heads, head_dim=32,
                                  num_slots=1024,
                                  read_layers=(nl - 2, nl - 1), write_layer=max(nl - 2, 0),
                                  values_from="embeddings")
    memory = AddressContentMemory(config)
    memory.allocate = args.allocate
    H, D = config.num_heads // 2, config.head_dim
    if args.mlp:
        C = config.hidden_size
        memory.address_mlp = torch.nn.Sequential(Standardize(C), torch.nn.Linear(C, 512),
                                                 torch.nn.GELU(), torch.nn.Linear(512, H * D))
        for reader in memory.readers:
            reader.query = torch.nn.Sequential(Standardize(C), torch.nn.Linear(C, 512),
                                               torch.nn.GELU(), torch.nn.Linear(512, 2 * H * D))
            reader.forward = types.MethodType(mlp_reader_forward, reader)
            reader.cosine_scale = args.cosine_read
            if args.allocate:
                reader.slot_mask_of = lambda: getattr(memory, "slot_mask", None)
    if args.load:
        memory.load_state_dict(torch.load(args.load))
        for m in memory.modules():
            if isinstance(m, Standardize):
                m.fitted = True
        args.pretrain_address, args.steps = 0, 0
    all_tokens = args.aux_negatives == "all"
    if "all" in (args.pretrain_negatives, args.aux_negatives) and not (args.cosine_read and
                                                                       args.allocate):
        ap.error("--pretrain-negatives / --aux-negatives all need --cosine-read and --allocate")
    if args.pretrain_address and args.pretrain_negatives == "all":
        pretrain_address_all_tokens(memory, model, tok, args.pretrain_address, args.cosine_read)
    elif args.pretrain_address:
        pretrain_address(memory, model, tok, args.pretrain_address, args.aux_temperature or 0.05)
    read_layer_output = {}  # the first reading layer's output, before the memory adds to it
    find_decoder_layers(model)[config.resolved_read_layers[0]].register_forward_hook(
        lambda m, a, o: read_layer_output.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    handle = memkernels.attach(model, memory)
    # pre-trained address/query parameters move 10x slower (Adam's first steps
    # moved them by ~lr each and undid the pre-training in one step)
    pretrained = ({id(p) for p in [*memory.address_mlp.parameters(),
                                   *memory.readers[0].query.parameters(), memory.slot_key]}
                  if args.pretrain_address else set())
    for p in memory.parameters():
        if args.freeze_address and id(p) in pretrained:
            p.requires_grad_(False)
    groups = [{"params": [p for p in memory.parameters() if p.requires_grad and id(p) not in pretrained]},
              {"params": [p for p in memory.parameters() if p.requires_grad and id(p) in pretrained],
               "lr": args.lr / 10}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr)
    start_time, history = time.time(), []
    for step in range(args.steps):
        batch, write_ids, write_mask, pre_object, asked = make_batch(tok, step, args.facts,
                                                                     args.curriculum,
                                                                     seed=1 + args.seed)
        B, n, tw = write_ids.shape
        hk, hv, _ = write_layer_hidden(model, memory, write_ids.reshape(B * n, tw),
                                    write_mask.reshape(B * n, tw))
        hk, hv = hk.reshape(B, n * tw, -1), hv.reshape(B, n * tw, -1)
        start = memory.init_bank.unsqueeze(0).expand(B, -1, -1, -1)
        handle.bank = MemoryBank(memory, memory.write(start, hk, write_mask.reshape(B, n * tw).bool(), hv))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             batch.labels[:, 1:].reshape(-1), ignore_index=-100)
        aux = torch.zeros(())
        if args.aux > 0 and all_tokens:  # each row's questions against all its written tokens
            keys = address_keys(memory, hk)  # [B, n * tw, H, D]
            q = read_queries(memory, read_layer_output["h"])
            flat_mask = write_mask.reshape(B, n * tw).bool()
            aux = sum(read_nll(q[b, [pos for pos, _ in asked[b]]], keys[b],
                               torch.tensor([j * tw + pre_object[b][j] for _, j in asked[b]]),
                               args.cosine_read, flat_mask[b]) for b in range(B)) / B
        elif args.aux > 0:
            keys = address_keys(memory, hk)
            candidates = torch.stack([keys[b, j * tw + p] for b in range(B)
                                      for j, p in enumerate(pre_object[b])])
            q = read_queries(memory, read_layer_output["h"])
            offsets = [0]
            for b in range(B):
                offsets.append(offsets[-1] + len(pre_object[b]))
            anchors = torch.stack([q[b, pos] for b in range(B) for pos, _ in asked[b]])
            targets = torch.tensor([offsets[b] + j for b in range(B) for _, j in asked[b]])
            aux = contrastive(anchors, candidates, targets, args.aux_temperature)
        loss = lm + args.aux * aux
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(memory.parameters(), 1.0)
        opt.step()
        history.append((lm.item(), aux.item()))
        if step % 100 == 0 or step == args.steps - 1:
            tail = history[-50:]
            print(f"step {step}: lm loss {sum(x for x, _ in tail) / len(tail):.3f}, aux loss "
                  f"{sum(y for _, y in tail) / len(tail):.3f}, {time.time() - start_time:.0f} s",
                  flush=True)
    handle.detach()
    memory.eval()
    if args.save:
        torch.save(memory.state_dict(), args.save)
    if args.eval_slots:
        grow_bank(memory, args.eval_slots)
    for n_facts in args.eval_facts:
        facts, others = make_facts(n_facts, seed=args.eval_seed, distractors=args.distractors)
        row = benchmark.evaluate("written_memory", model, tok, facts, others, memory=memory)
        print(f"N={n_facts}: exact match {row['accuracy']:.3f} ({row['questions']} questions)",
              flush=True)
        if args.allocate:
            hits = read_hits(memory, model, tok, facts, read_layer_output)
            print(f"N={n_facts}: the read's largest weight on the asked statement's pre-object "
                  f"slot {hits['hit']:.3f}, mean weight there {hits['mass']:.3f}", flush=True)


if __name__ == "__main__":
    main()
