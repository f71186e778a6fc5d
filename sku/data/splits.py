"""Seeded evaluation splits and the per-step row schedule of a training pool."""

from __future__ import annotations

import random
from collections.abc import Iterable

from sku.data.readers import Pair


class Schedule:
    """The rows of a pool for each optimizer step: one seeded permutation per epoch, so the
    rows of step s are a pure function of (seed, s) and resuming needs no loader state."""

    def __init__(self, size: int, batch_size: int, seed: str):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._epoch, self._order = -1, []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = random.Random(f"{self.seed}/epoch{epoch}").sample(
                range(self.size), self.size)
            self._epoch = epoch
        return self._order

    def rows(self, step: int) -> list[int]:
        first = step * self.batch_size
        return [self._permutation(i // self.size)[i % self.size]
                for i in range(first, first + self.batch_size)]


def first_per_prompt(pairs: Iterable[Pair]) -> list[Pair]:
    first: dict[str, Pair] = {}
    for pair in pairs:
        first.setdefault(pair.prompt, pair)
    return list(first.values())


def hold_out(pairs: list[Pair], size: int, seed: str) -> tuple[list[Pair], list[Pair]]:
    """(pairs to train on, held-out prompts): up to `size` prompts, at most a quarter of them,
    set aside with every pair that has them."""
    prompts = first_per_prompt(pairs)
    held = random.Random(seed).sample(prompts, min(size, len(prompts) // 4))
    held_prompts = {p.prompt for p in held}
    return [p for p in pairs if p.prompt not in held_prompts], held


def visited_prompts(pool: list[Pair], schedule: Schedule, steps: int,
                    size: int, seed: str) -> list[Pair]:
    """Up to `size` prompts that the first `steps` steps of `schedule` train on."""
    rows = sorted({row for step in range(steps) for row in schedule.rows(step)})
    prompts = first_per_prompt(pool[row] for row in rows)
    return random.Random(seed).sample(prompts, min(size, len(prompts)))


def splits_json(splits: dict[str, list[Pair]], **provenance) -> dict:
    return {**provenance, **{name: [{"record": p.record, "prompt": p.prompt} for p in prompts]
                             for name, prompts in splits.items()}}
