"""What the frozen base LM gives a memory to key on, layer by layer.

    python -m memkernels.apps.recall.probe [--names 200]
    python -m memkernels.apps.recall.probe --address-ceiling

A memory can only recall a fact about X if the hidden state where the answer
is predicted identifies X. For held-out (eval-split) names this prints, per
layer output (index 0 = embeddings):
- question->question: nearest-neighbour accuracy (cosine, centred) between the
  answer position of two different question templates about the same names;
- question->statement: the same between a question's answer position and a
  statement's object position ("X lives in" -> ...), after a ridge map fitted
  on other (train-split) names: the best a linear query projection could do;
- slots hit: how many distinct slots the statement positions' queries pick
  first (per head) in a freshly initialised memory reading that layer; few
  means every fact starts out competing for the same slots;
- object: at the first token of a statement's object ("... lives in Paris"),
  which object it is, by nearest class centroid (held-out statements; chance
  1 / objects): what a value written from that layer can still say.
Chance for the name accuracies is 1 / names.

--address-ceiling: the same question->statement match on the benchmark's own
templates and relations, as N-way retrieval among N written facts, by a
linear map (what the memory's bilinear read can reach) and by contrastively
trained MLPs (what a nonlinear query/address could); see address_ceiling.
"""
from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from memkernels.hf import text_end_states
from memkernels.apps.recall import base_lm, tasks
from memkernels.apps.recall.facts import make_facts, make_name, qa_prompt

QUESTION_A = "Q: Where does {s} live? A:"
QUESTION_B = "Q: In which city does {s} live? A:"
STATEMENT = "{s} lives in"


def last_token_states(model, tokenizer, names: list[str], template: str) -> torch.Tensor:
    """[names, layers + 1, hidden]: every layer's output at the last token."""
    return text_end_states(model, tokenizer, [template.format(s=n) for n in names])


def nearest_neighbour_accuracy(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows of a whose most similar row of b (cosine, each set
    centred) is the same index."""
    a = F.normalize(a - a.mean(0), dim=-1)
    b = F.normalize(b - b.mean(0), dim=-1)
    return (a @ b.T).argmax(1).eq(torch.arange(len(a))).float().mean().item()


def ridge_map(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    x = x - x.mean(0)
    return torch.linalg.solve(x.T @ x + alpha * torch.eye(x.shape[1]), x.T @ (y - y.mean(0)))


def distinct_first_slots(model, hidden: torch.Tensor, seed: int = 0) -> list[int]:
    """Per head, the number of distinct slots that rows of `hidden` attend to
    most in a fresh default memory (its first reader's query projection)."""
    memory = tasks.default_memory(model, seed=seed)
    reader = memory.readers[0]
    c = memory.config
    with torch.no_grad():
        q = reader.query(reader.norm(hidden)).view(len(hidden), c.num_heads, c.head_dim)
        keys, _ = memory.bank_keys_values(memory.init_bank[None])
        top = torch.einsum("nhd,hsd->hns", q, keys).argmax(-1)
    return [len(set(t.tolist())) for t in top]


def object_identity(model, tokenizer, statements: int = 1500, seed: int = 0) -> list[float]:
    """Per layer output: nearest-centroid accuracy of which object sits at the
    object's first token (centroids from 80% of the statements, scored on the rest)."""
    rng = random.Random(seed)
    states, labels = [], []
    for _ in range(statements):
        fact = tasks.random_fact(rng)
        text = fact.statement(rng)
        position = len(tokenizer(text.rsplit(fact.object, 1)[0].rstrip())["input_ids"])
        with torch.no_grad():
            hidden = model(torch.tensor([tokenizer(text)["input_ids"]]),
                           output_hidden_states=True).hidden_states
        states.append(torch.stack([h[0, position] for h in hidden]))
        labels.append(fact.object)
    x = torch.stack(states)  # [statements, layers + 1, hidden]
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(o) for o in labels])
    fit = int(0.8 * statements)
    accuracy = []
    for layer in range(x.shape[1]):
        xs = x[:, layer] - x[:fit, layer].mean(0)
        centroids = torch.stack([xs[:fit][y[:fit] == c].mean(0) if (y[:fit] == c).any()
                                 else torch.full((xs.shape[1],), float("nan"))
                                 for c in range(len(classes))]).nan_to_num(0.0)
        scores = F.normalize(xs[fit:], dim=-1) @ F.normalize(centroids, dim=-1).T
        accuracy.append(scores.argmax(1).eq(y[fit:]).float().mean().item())
    return accuracy


def address_ceiling(model, tokenizer, sizes=(10, 100, 1000), fit_facts: int = 8000,
                    draws: int = 3, mlp_steps: int = 3000, seed: int = 11,
                    context_decay: float = 0.0, log=print) -> list[dict]:
    """How well a read address can find the right written fact, on the
    benchmark's own mix of templates and relations: each of N held-out
    questions' answer position ("Q: Where does X live? A:") must pick its own
    statement's pre-object position ("X has a home in"), among the N written,
    as the most similar. Two address maps, fitted on train-split facts:
    - linear: a ridge map from question to statement states, then cosine
      nearest neighbour, per layer output. The memory's read is such a
      bilinear match (a linear query projection against keys projected from
      what was written), so this is what its design can reach;
    - mlp: two 2-layer MLPs (question side, statement side) trained with a
      contrastive loss (InfoNCE over batches of 512), at the layer where the
      linear map does best: what a nonlinear query/address could reach;
    - with context_decay > 0, also MLPs on that layer's state and the
      decayed context of the embeddings beside it (what an append memory with
      MemoryConfig(context_decay=...) reads), as mlp_context.
    Averaged over `draws` sets of facts."""
    def states(facts, rng):
        """(question states, statement states), each [N, layers + 1, C], with
        the decayed context [N, C] appended as one more "layer" when asked."""
        questions = [qa_prompt(f.question(rng)) for f in facts]
        prefixes = [f.statement(rng).rsplit(f.object, 1)[0].rstrip() for f in facts]
        out = []
        for texts in (questions, prefixes):
            got = text_end_states(model, tokenizer, texts, context_decay=context_decay)
            out.append(torch.cat([got[0], got[1][:, None]], 1) if context_decay else got)
        return tuple(out)
    rng = random.Random(seed)
    fit_q, fit_s = states(make_facts(fit_facts, seed, split="train")[0], rng)
    held = {n: [states(make_facts(n, seed + 1 + d)[0], rng) for d in range(draws)] for n in sizes}
    layers = range(fit_q.shape[1] - (1 if context_decay else 0))
    maps = [ridge_map(fit_q[:, layer], fit_s[:, layer], alpha=0.1) for layer in layers]
    linear = {n: [sum(nearest_neighbour_accuracy((q[:, layer] - fit_q[:, layer].mean(0)) @ w,
                                                 st[:, layer]) for q, st in held[n]) / draws
                  for layer, w in enumerate(maps)] for n in sizes}
    best = max(layers, key=lambda layer: linear[max(sizes)][layer])

    def mlp_accuracy(features) -> dict:
        encode_q, encode_s = _contrastive_mlps(features(fit_q), features(fit_s), mlp_steps, seed,
                                               log)
        with torch.no_grad():
            return {n: sum((F.normalize(encode_q(features(q)), dim=-1)
                            @ F.normalize(encode_s(features(st)), dim=-1).T)
                           .argmax(1).eq(torch.arange(n)).float().mean().item()
                           for q, st in held[n]) / draws for n in sizes}
    mlp = mlp_accuracy(lambda x: x[:, best])
    with_context = mlp_accuracy(lambda x: torch.cat([x[:, best], x[:, -1]], -1)) if context_decay else {}
    return [dict(facts=n, linear_per_layer=linear[n], mlp_layer=best, mlp=mlp[n],
                 **({"mlp_context": with_context[n]} if context_decay else {})) for n in sizes]


def _contrastive_mlps(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, log):
    """Two MLPs whose outputs match row i of x to row i of y (InfoNCE)."""
    torch.manual_seed(seed)

    def mlp(data):
        mean, std = data.mean(0), data.std(0) + 1e-6
        net = torch.nn.Sequential(torch.nn.Linear(data.shape[1], 512), torch.nn.GELU(),
                                  torch.nn.Linear(512, 256))
        return net, lambda h: net((h - mean) / std)
    (net_x, encode_x), (net_y, encode_y) = mlp(x), mlp(y)
    opt = torch.optim.AdamW([*net_x.parameters(), *net_y.parameters()], lr=1e-3,
                            weight_decay=1e-2)
    for step in range(steps):
        rows = torch.randint(0, len(x), (512,))
        logits = (F.normalize(encode_x(x[rows]), dim=-1)
                  @ F.normalize(encode_y(y[rows]), dim=-1).T) / 0.05
        loss = F.cross_entropy(logits, torch.arange(len(rows)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 1000 == 0:
            log(f"contrastive MLPs: step {step}, loss {loss.item():.2f}")
    return encode_x, encode_y


def run(n_names: int = 200, fit_names: int = 2000, seed: int = 5, statements: int = 1500,
        log=print) -> list[dict]:
    model, tokenizer = base_lm.load()
    rng = random.Random(seed)
    fit = list(dict.fromkeys(make_name(rng, "train") for _ in range(3 * fit_names)))[:fit_names]
    held = list(dict.fromkeys(make_name(rng, "eval") for _ in range(3 * n_names)))[:n_names]
    qa, qb, st = (last_token_states(model, tokenizer, held, t)
                  for t in (QUESTION_A, QUESTION_B, STATEMENT))
    fit_q, fit_s = (last_token_states(model, tokenizer, fit, t) for t in (QUESTION_A, STATEMENT))
    objects = object_identity(model, tokenizer, statements)
    rows = []
    for layer in range(qa.shape[1]):
        w = ridge_map(fit_q[:, layer], fit_s[:, layer])
        mapped = (qa[:, layer] - fit_q[:, layer].mean(0)) @ w
        row = dict(layer=layer,
                   question_question=nearest_neighbour_accuracy(qa[:, layer], qb[:, layer]),
                   question_statement=nearest_neighbour_accuracy(mapped, st[:, layer]),
                   slots_hit=distinct_first_slots(model, st[:, layer]),
                   object=objects[layer])
        rows.append(row)
        log(f"layer output {layer}: question->question {row['question_question']:.2f}, "
            f"question->statement (ridge) {row['question_statement']:.2f}, "
            f"slots hit per head {row['slots_hit']} (of {len(held)} names; chance "
            f"{1 / len(held):.3f}); object at its own token {row['object']:.2f}")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--names", type=int, default=200)
    ap.add_argument("--address-ceiling", action="store_true",
                    help="instead: the best linear question -> statement address at N facts")
    ap.add_argument("--context-decay", type=float, default=0.0,
                    help="with --address-ceiling: also MLPs that read the decayed context")
    args = ap.parse_args(argv)
    if args.address_ceiling:
        model, tokenizer = base_lm.load()
        for row in address_ceiling(model, tokenizer, context_decay=args.context_decay):
            print(f"N={row['facts']}: a question finds its statement among the N: linear map "
                  f"per layer output (0 = embeddings) "
                  + ", ".join(f"{a:.2f}" for a in row["linear_per_layer"])
                  + f"; MLPs at layer output {row['mlp_layer']}: {row['mlp']:.2f}"
                  + (f"; with the context: {row['mlp_context']:.2f}" if "mlp_context" in row else ""))
        return
    run(args.names)


if __name__ == "__main__":
    main()
