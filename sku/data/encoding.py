"""Tokenisation with answer positions, and padding rows into tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sku.data.readers import Pair
from sku.data.template import PAPER, Template
from sku.errors import SkuError


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    answer_start: int  # input_ids[answer_start:] are the answer's tokens

    @property
    def answer_tokens(self) -> int:
        return len(self.input_ids) - self.answer_start


def encode(tokenizer, pairs: Sequence[Pair], max_length: int,
           template: Template = PAPER) -> list[Encoded]:
    """Template, tokenise and truncate. The answer starts at the first token whose character
    span reaches into the response, so a token merging the separating space with the answer's
    first word belongs to the answer; this needs a fast tokenizer's offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise SkuError(f"{tokenizer.name_or_path}: a fast tokenizer is needed "
                       "(answer positions come from its character offsets)")
    heads = [template.head(tokenizer, p.prompt) for p in pairs]
    texts = [f"{head}{template.separator}{p.response}"
             for head, p in zip(heads, pairs, strict=True)]
    batch = tokenizer(texts, return_offsets_mapping=True, truncation=True, max_length=max_length,
                      add_special_tokens=template.add_special_tokens)
    encoded = []
    for ids, offsets, head in zip(batch["input_ids"], batch["offset_mapping"], heads,
                                  strict=True):
        response_start = len(head) + len(template.separator)
        start = next((i for i, (_, end) in enumerate(offsets) if end > response_start), len(ids))
        encoded.append(Encoded(list(ids), start))
    return encoded


def with_answers(tokenizer, pairs: list[Pair], max_length: int, template: Template = PAPER,
                 chunk: int = 2048) -> list[Pair]:
    """Pairs whose answer keeps at least one token after truncation to max_length."""
    kept = []
    for i in range(0, len(pairs), chunk):
        part = pairs[i:i + chunk]
        kept += [p for p, e in zip(part, encode(tokenizer, part, max_length, template),
                                   strict=True)
                 if e.answer_tokens > 0]
    return kept


def pad_batch(encoded: list[Encoded], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded to the longest row."""
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for r, e in enumerate(encoded):
        input_ids[r, :len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[r, :len(e.input_ids)] = 1
    return input_ids, attention_mask


def answer_positions(e: Encoded, row: int, width: int) -> list[int]:
    """Flat positions (row·width + t) that predict the answer: position t predicts token t + 1,
    so from answer_start − 1 to the last position but one."""
    return [row * width + t for t in range(e.answer_start - 1, len(e.input_ids) - 1)]


def pad_id(tokenizer) -> int:
    """Any id will do: padding positions are masked by position, never by id."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0
