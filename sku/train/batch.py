"""The rows of each optimizer step and their per-token loss weights, as tensors.

An effective batch holds `batch_size` examples. Example i of step s is: forget row i of the
forget schedule, its k mismatch rows, normal row i and safe row i — whichever the method's
active terms use. Examples are split whole over processes and accumulation steps; every
token's weight is sku.train.methods.token_weight, counted over the whole effective batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from sku.data.encoding import Encoded, answer_positions, encode, pad_batch, pad_id
from sku.data.readers import Pair
from sku.data.splits import Schedule
from sku.data.template import PAPER, Template
from sku.train.methods import Method, Term, token_weight


@dataclass(frozen=True)
class Row:
    pair: Pair
    term: int  # index into the active terms
    rows: int  # rows of its term in its example (k for mismatch rows, else 1)
    pool_index: int  # row of the term's pool (the teacher cache's key for normal rows)


def draw_others(pool: list[Pair], own: Pair, k: int, rng: random.Random) -> list[int]:
    """k distinct random rows of `pool` sharing neither the prompt nor the response of `own`
    (random disassociation: never the row's own response, drawn per prompt)."""
    def eligible(j: int) -> bool:
        return pool[j].prompt != own.prompt and pool[j].response != own.response

    chosen: dict[int, None] = {}
    # Rejection sampling: cheap when most of the pool is eligible. Bounded by the pool too: a
    # k of a billion would otherwise spin for hours before the draw below.
    for _ in range(20 * min(k, len(pool))):
        if len(chosen) == k:
            return list(chosen)
        j = rng.randrange(len(pool))
        if eligible(j):
            chosen.setdefault(j)
    rest = [j for j in range(len(pool)) if eligible(j) and j not in chosen]
    return list(chosen) + rng.sample(rest, min(k - len(chosen), len(rest)))


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (R, T), right-padded
    attention_mask: torch.Tensor  # (R, T)
    positions: torch.Tensor  # (M,) flat indices into R×T of the positions that predict answers
    labels: torch.Tensor  # (M,) the answer token each position predicts
    ce_weight: torch.Tensor  # (M,)
    kl_weight: torch.Tensor  # (M,)
    term: torch.Tensor  # (M,) index of the active term, for logging
    cache_rows: list[tuple[int, int]]  # (first position, normal pool row) for cached teachers
    tokens: int  # non-padding tokens, for throughput

    def inputs(self, device, teacher_cache=None) -> dict:
        inputs = {name: getattr(self, name).to(device) for name in
                  ("input_ids", "attention_mask", "positions", "labels", "ce_weight",
                   "kl_weight")}
        if teacher_cache is not None and self.cache_rows:
            teacher = torch.zeros(len(self.positions), teacher_cache.width,
                                  dtype=teacher_cache.dtype)
            for first, row in self.cache_rows:
                states = teacher_cache.states[row]
                teacher[first:first + len(states)] = states
            inputs["teacher_hidden"] = teacher.to(device)
        return inputs


def collate(rows: list[Row], encoded: list[Encoded], terms: list[tuple[Term, float]], *,
            batch_size: int, pad_token_id: int) -> MicroBatch:
    input_ids, attention_mask = pad_batch(encoded, pad_token_id)
    width = input_ids.shape[1]
    positions, labels, ce, kl, term_of, cache_rows = [], [], [], [], [], []
    for r, (row, e) in enumerate(zip(rows, encoded, strict=True)):
        span = answer_positions(e, r, width)
        term, term_weight = terms[row.term]
        weight = token_weight(term_weight, batch_size=batch_size, rows=row.rows,
                              answer_tokens=e.answer_tokens)
        is_kl = term.loss == "kl"
        if is_kl:
            cache_rows.append((len(positions), row.pool_index))
        positions += span
        labels += e.input_ids[e.answer_start:]
        ce += [0.0 if is_kl else weight] * len(span)
        kl += [weight if is_kl else 0.0] * len(span)
        term_of += [row.term] * len(span)
    # Weights in float64: the kernel rounds them once, to its own statistics' precision.
    return MicroBatch(input_ids, attention_mask, torch.tensor(positions), torch.tensor(labels),
                      torch.tensor(ce, dtype=torch.float64), torch.tensor(kl, dtype=torch.float64),
                      torch.tensor(term_of), cache_rows, int(attention_mask.sum()))


class StepBuilder:
    """Rows of every step for one method, from the training pools."""

    def __init__(self, method: Method, eps, pools: dict[str, list[Pair]], tokenizer, *,
                 batch_size: int, k: int, max_length: int, seed: int,
                 template: Template = PAPER):
        self.terms = method.active_terms(tuple(eps))
        self.pools = pools
        self.tokenizer, self.max_length, self.template = tokenizer, max_length, template
        self.batch_size, self.k, self.seed = batch_size, k, seed
        self.mismatch_pool = pools[method.mismatch_pool] if method.mismatch_pool else []
        kinds = {"forget" if t.rows == "mismatch" else t.rows for t, _ in self.terms}
        self.schedules = {kind: schedule(kind, len(pools[kind]), batch_size, seed)
                          for kind in kinds}

    def examples(self, step: int) -> list[list[Row]]:
        """The effective batch of `step`: one list of rows per example."""
        rows = {kind: s.rows(step) for kind, s in self.schedules.items()}
        examples = []
        for i in range(self.batch_size):
            example = []
            for index, (term, _) in enumerate(self.terms):
                if term.rows != "mismatch":
                    j = rows[term.rows][i]
                    example.append(Row(self.pools[term.rows][j], index, 1, j))
                    continue
                own = self.pools["forget"][rows["forget"][i]]
                rng = random.Random(f"{self.seed}/mismatch/{step}/{i}")
                drawn = draw_others(self.mismatch_pool, own, self.k, rng)
                for j in drawn:
                    pair = Pair(own.prompt, self.mismatch_pool[j].response,
                                self.mismatch_pool[j].record)
                    example.append(Row(pair, index, len(drawn), j))
            examples.append(example)
        return examples

    def micro_batches(self, step: int, rank: int, world_size: int,
                      micro_batch_size: int) -> list[MicroBatch]:
        """This process's micro-batches of `step` (its contiguous share of the examples)."""
        per_rank = self.batch_size // world_size
        mine = self.examples(step)[rank * per_rank:(rank + 1) * per_rank]
        batches = []
        for first in range(0, per_rank, micro_batch_size):
            rows = [row for example in mine[first:first + micro_batch_size] for row in example]
            encoded = encode(self.tokenizer, [r.pair for r in rows], self.max_length,
                             self.template)
            batches.append(collate(rows, encoded, self.terms, batch_size=self.batch_size,
                                   pad_token_id=pad_id(self.tokenizer)))
        return batches


def schedule(kind: str, size: int, batch_size: int, seed: int) -> Schedule:
    """The schedule of one pool; shared with the splits, which pick unlearned prompts from the
    forget rows that training visits."""
    return Schedule(size, batch_size, f"{seed}/{kind}")
