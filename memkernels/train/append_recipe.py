"""The append rule's training recipe: pre-train the address (pretrain_address)
so that a question finds its statement among the written tokens, then train
jointly on episodes with what was pre-trained frozen (append_joint_config).
Why each step: docs/design.md, "Training the append rule"."""
from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from memkernels.hf import text_end_states, write_layer_hidden
from memkernels.memory.append import AppendMemory, address_nll
from memkernels.train.trainer import TrainConfig


# after pretrain_address, what it fitted stays as it is in the joint training:
# the address, the first reader's query and the norms in front of them. At
# lr / 10 with a contrastive address loss the joint training still pulled the
# address away from the standalone questions it was fitted on (the read found
# the asked statement among 1000 36% of the time, against 57% before it) and
# recall fell with it (docs/design.md, "Training the append rule")
PRETRAINED_LR_SCALES = {"address.": 0.0, "slot_key": 0.0, "readers.0.query.": 0.0,
                        "readers.0.norm.": 0.0, "write_norm.": 0.0, "keep.": 0.0}


def append_joint_config(**overrides) -> TrainConfig:
    """The joint training of an append-rule memory after pretrain_address:
    the pre-trained parameters frozen (PRETRAINED_LR_SCALES), AdamW's usual
    weight decay, a constant rate after the warmup (the curriculum reaches
    the most facts per episode late; docs/design.md, "Training the append rule")."""
    return TrainConfig(**{**dict(weight_decay=0.01, lr_scales=PRETRAINED_LR_SCALES,
                                 schedule="constant"), **overrides})


def store_targets(statements: list[str], targets: list[int]) -> list[Tensor]:
    """Per pair, the tokens of its statement that the store gate must keep:
    every token some pair targets in that same statement. A fact of several
    answer tokens has a pair per token; each pair's own target alone would
    teach the gate to drop the statement's other answer tokens (it kept
    none of them at threshold 0.3, and the memory stored nothing)."""
    kept: dict[str, set[int]] = {}
    for statement, target in zip(statements, targets):
        kept.setdefault(statement, set()).add(target)
    return [torch.tensor(sorted(kept[s])) for s in statements]


# a group's statements all enter one batch together
MAX_GROUP_STATEMENTS = 16


def sibling_pairs(statements: Sequence[str], groups: Sequence[Hashable]) -> list[list[list[int]]]:
    """Per pair, the pairs of each other statement in its group (one list per
    statement, in order of first appearance)."""
    by_group: dict[Hashable, dict[str, list[int]]] = {}
    for i, (statement, group) in enumerate(zip(statements, groups)):
        by_group.setdefault(group, {}).setdefault(statement, []).append(i)
    largest = max((len(g) for g in by_group.values()), default=0)
    if largest > MAX_GROUP_STATEMENTS:
        raise ValueError(f"groups: a group holds {largest} statements; a group is the few facts "
                         f"about one subject (at most {MAX_GROUP_STATEMENTS})")
    return [[pairs for other, pairs in by_group[group].items() if other != statement]
            for statement, group in zip(statements, groups)]


def draw_rows(n: int, batch: int, gen: torch.Generator,
              siblings: list[list[list[int]]] | None = None,
              statements: Sequence[str] | None = None) -> list[int]:
    """batch of the n pairs at random; with siblings (sibling_pairs, over
    `statements`), each pair drawn is followed by one random pair of each of
    its siblings, and no statement enters the batch twice (its tokens would
    be two identical candidates); a pair whose siblings do not all fit is
    left out."""
    order = torch.randperm(n, generator=gen).tolist()
    if siblings is None:
        return order[:batch]
    if statements is None:
        raise ValueError("draw_rows with siblings needs the pairs' statements")
    rows: list[int] = []
    taken: set[str] = set()
    for r in order:
        if statements[r] in taken or len(rows) + 1 + len(siblings[r]) > batch:
            continue
        group = [r] + [pairs[int(torch.randint(len(pairs), (1,), generator=gen))]
                       for pairs in siblings[r]]
        if any(statements[g] in taken for g in group[1:]):
            continue
        rows += group
        taken.update(statements[g] for g in group)
        if len(rows) == batch:
            break
    return rows


def pretrain_address(memory, llm: nn.Module, tokenizer, queries: list[str], statements: list[str],
                     targets: list[int], *, steps: int, batch: int = 256, lr: float = 1e-3,
                     seed: int = 0, groups: Sequence[Hashable] | None = None,
                     progress: bool = True) -> list[float]:
    """Pre-trains an append-rule memory's address (the address MLP, slot_key
    and the first reader's query MLP) with the LLM frozen: query text i must
    find token targets[i] of statement i, when its statement and those of the
    other batch - 1 pairs are written (every token a candidate, its own
    statement's other tokens too), scored as the read scores
    (memory.append.address_nll). First fits the MLPs' input statistics on the
    same states. groups (one per pair, e.g. the fact's subject): a pair drawn
    into a batch brings one pair of each other statement of its group, so
    that a question meets the statements it must be told apart from (the
    same name, another relation), which random batches almost never hold. Without it the joint training does not find the address in
    a few thousand steps (docs/design.md, "Training the append rule"). Returns the
    losses."""
    if not isinstance(memory, AppendMemory):
        raise TypeError("pretrain_address needs an append-rule memory "
                        "(MemoryConfig(write_rule='append'))")
    decay = memory.config.context_decay
    if not len(queries) == len(statements) == len(targets) or len(queries) < 2:
        raise ValueError(f"queries, statements and targets must be as long, at least 2, got "
                         f"{len(queries)}, {len(statements)}, {len(targets)}")
    if groups is not None and len(groups) != len(queries):
        raise ValueError(f"groups must have one entry per pair ({len(queries)}), got {len(groups)}")
    siblings = None if groups is None else sibling_pairs(statements, groups)
    batch = min(batch, len(queries))
    device = memory.init_bank.device
    layers = [i + 1 for i in memory.config.resolved_read_layers]  # hidden_states index
    ends = text_end_states(llm, tokenizer, queries, context_decay=decay)
    q_states, q_context = ends if decay else (ends, None)
    q_states = q_states[:, layers].to(device)  # [N, readers, C]
    q_context = q_context.to(device) if decay else None  # [N, C]
    tokens, token_contexts = [], []
    for i in range(0, len(statements), 100):
        ids = [tokenizer(t)["input_ids"] for t in statements[i:i + 100]]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        with torch.no_grad():
            hidden, _, context = write_layer_hidden(llm, memory, input_ids, mask)
        tokens += [hidden[r, :len(x)] for r, x in enumerate(ids)]
        if context is not None:  # the write context: decayed, and the next state with lookahead
            token_contexts += [context[r, :len(x)] for r, x in enumerate(ids)]
    for t, (tok_states, target) in enumerate(zip(tokens, targets)):
        if not 0 <= target < len(tok_states):
            raise ValueError(f"targets[{t}] = {target} is not a token of statement {t} "
                             f"({len(tok_states)} tokens)")
    # reader 0 is pre-trained on the question ends alone: its statistics from
    # there; the others read every position untrained: theirs from every token
    # of the questions (fitted on the ends alone, N=100 came out 72-81%)
    every = text_end_states(llm, tokenizer, queries[:1000], every_token=True, context_decay=decay)
    every, every_context = every if decay else (every, None)
    memory.fit_statistics(torch.cat(tokens), [q_states[:, 0]] + [every[:, i].to(device)
                                                                 for i in layers[1:]],
                          torch.cat(token_contexts) if token_contexts else None,
                          [q_context] + [every_context.to(device)] * (len(layers) - 1)
                          if decay else None)
    keep_rows = store_targets(statements, targets)
    reader = memory.readers[0]
    gate = list(memory.keep.parameters()) if memory.keep is not None else []
    params = [*memory.address.parameters(), memory.slot_key, *reader.query.parameters(), *gate]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="pre-train address", disable=not progress)
    losses = []
    for _ in bar:
        rows = draw_rows(len(queries), batch, gen, siblings, statements)
        candidates = torch.cat([tokens[r] for r in rows])[None]  # [1, K, C]
        contexts = torch.cat([token_contexts[r] for r in rows])[None] if token_contexts else None
        starts = torch.tensor([0] + [len(tokens[r]) for r in rows[:-1]]).cumsum(0)
        target = (starts + torch.tensor([targets[r] for r in rows])).to(device)
        # [batch, P, Dh]: copy 0 of each pair
        q = reader.queries(q_states[rows, :1], q_context[rows, None] if decay else None)[:, 0, 0]
        loss = address_nll(q, memory.address_keys(candidates, contexts)[0], target, reader.scale)
        if gate:
            keep = torch.cat([start + keep_rows[r] for start, r in zip(starts.tolist(), rows)])
            is_target = candidates.new_zeros(candidates.shape[1]).index_fill_(0, keep.to(device), 1.0)
            loss = loss + F.binary_cross_entropy_with_logits(memory.keep_logits(candidates)[0],
                                                             is_target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
