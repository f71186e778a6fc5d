"""Judges in this process on a local causal LM (a folder, a hub id in the local cache, or a GGUF
file): the paper's few-shot prompt through the model's chat template (plain text when it has
none), or a Llama Guard checkpoint's own conversation classification. Batched greedy decoding;
the model loads at the first pair not in the cache, so a fully cached rerun never loads it."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from sku.errors import loading
from sku.evaluation.judges.parse import parse_guard, parse_verdict
from sku.evaluation.judges.prompt import Example, build_messages, build_text, examples_tag
from sku.evaluation.judges.verdict import JudgeError, UnreadableReply, Verdict

log = logging.getLogger(__name__)
STYLES = ("fewshot", "llamaguard")
# Llama Guard 1–3 templates all open with "Task: Check if there is unsafe content in ...".
_GUARD_TEMPLATE = re.compile(r"unsafe content in", re.I)
MIN_SHARED_PREFIX = 16  # tokens: below this a prefix cache saves less than it costs


def _identity(folder: Path) -> str:
    """The model's files (names, sizes, mtimes): part of the cache key, so that verdicts of a
    changed or different model are never reused. A GGUF file's folder is named by its hash."""
    from sku.evaluation.evaluate import _fingerprint_folder  # evaluate imports the judges

    return hashlib.sha256(json.dumps(_fingerprint_folder(folder)).encode()).hexdigest()[:12]


def _common_prefix(rows: list[list[int]]) -> list[int]:
    """The tokens every row starts with, leaving each row at least one token of its own."""
    shortest = min(map(len, rows))
    n = 0
    while n < shortest - 1 and all(row[n] == rows[0][n] for row in rows):
        n += 1
    return rows[0][:n]


class LocalJudge:
    """`style` fewshot: Table 3's kind from the few-shot prompt (parse_verdict); llamaguard:
    harmful or not from `safe` / `unsafe\\nS…` (parse_guard), which names no Table 3 kind.
    None detects Llama Guard from the chat template. Pairs go `batch_size` to a generate call,
    sorted by length, each row padded on the left of its own tokens, after the start that all
    share (see _generate); at most `max_new_tokens` are generated per verdict."""

    remote = False

    def __init__(self, model: str, style: str | None = None, batch_size: int = 8,
                 max_new_tokens: int = 32, examples: Sequence[Example] | None = None):
        from transformers import AutoTokenizer

        import taskvec

        try:
            self.folder = taskvec.resolve(model, "judge model")
        except taskvec.TaskVecError as e:
            raise JudgeError(str(e)) from None
        with loading(model, "the judge's tokenizer", JudgeError):
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        template = self.tokenizer.chat_template
        if style is None:
            style = "llamaguard" if template and _GUARD_TEMPLATE.search(template) else "fewshot"
        if style == "llamaguard" and not template:
            raise JudgeError(f"{model}: --judge llamaguard needs the model's chat template "
                             "(Llama Guard's tokenizer_config.json carries it)")
        if style == "llamaguard" and examples is not None:
            raise JudgeError("--few-shot: Llama Guard classifies by its own policy, without "
                             "examples")
        self.style, self.batch_size, self.max_new_tokens = style, batch_size, max_new_tokens
        self.examples = examples
        self.model = None
        prefix = "llamaguard" if style == "llamaguard" else "hf"
        self.name = (f"{prefix}:{Path(model).name}@{_identity(self.folder)}"
                     f"{examples_tag(examples)}")

    def text(self, prompt: str, response: str) -> str:
        """What the model is given for one pair."""
        if self.style == "llamaguard":  # the response is the turn it assesses
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": response}]
        elif self.tokenizer.chat_template:
            messages = build_messages(prompt, response, self.examples)
        else:
            return build_text(prompt, response, self.examples)
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def verdict(self, reply: str) -> Verdict:
        if self.style == "llamaguard":
            harmful, reason = parse_guard(reply)
            return Verdict(harmful, None, reason, self.name)
        harmful, category, reason = parse_verdict(reply)
        return Verdict(harmful, category, reason, self.name)

    def __call__(self, prompt: str, response: str) -> Verdict:
        ((_, outcome),) = self.judge_many([(prompt, response)])
        if isinstance(outcome, UnreadableReply):
            raise outcome
        return outcome

    def judge_many(self, pairs: Sequence[tuple[str, str]]
                   ) -> Iterator[tuple[int, Verdict | UnreadableReply]]:
        """(index, verdict or unreadable reply) for each pair, a batch at a time, as each
        batch is decoded (not in order: batches are sorted by length)."""

        if self.model is None:
            self._load()
        # A chat template writes its own special tokens; plain text gets the tokenizer's.
        special = not (self.style == "llamaguard" or self.tokenizer.chat_template)
        ids = [self.tokenizer(self.text(*pair), add_special_tokens=special)["input_ids"]
               for pair in pairs]
        order = sorted(range(len(pairs)), key=lambda i: len(ids[i]))
        config = self.model.config
        context = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None)
        if context and len(ids[order[-1]]) + self.max_new_tokens > context:
            raise JudgeError(f"judge {self.name}: a prompt of {len(ids[order[-1]])} tokens "
                             f"and {self.max_new_tokens} new ones exceed the model's context "
                             f"({context})")
        shared = _common_prefix([ids[i] for i in order])
        cache = self._prefix_cache(shared) if len(shared) >= MIN_SHARED_PREFIX else None
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            replies = self._generate([ids[i] for i in batch], shared if cache else [], cache)
            for i, reply in zip(batch, replies, strict=True):
                try:
                    yield i, self.verdict(reply)
                except UnreadableReply as e:
                    yield i, e

    def _prefix_cache(self, shared: list[int]):
        """The key/value cache of the tokens every text starts with (the criteria and the
        examples), computed once, so each pair pays only for its own tokens."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        device = next(self.model.parameters()).device
        with torch.no_grad():
            self.model(input_ids=torch.tensor([shared], device=device), cache=cache,
                       use_cache=True)
        return cache

    def _generate(self, rows: list[list[int]], shared: list[int], cache) -> list[str]:
        """Greedy replies to token rows that all start with `shared` (whose key/value cache
        is `cache`; none when empty): each row is `shared`, left padding, its own tokens, so
        the cache serves every row; positions come from the attention mask."""
        import copy

        import torch

        pad = self.tokenizer.pad_token_id
        tails = [row[len(shared):] for row in rows]
        width = max(map(len, tails))
        input_ids = [shared + [pad] * (width - len(t)) + t for t in tails]
        mask = [[1] * len(shared) + [0] * (width - len(t)) + [1] * len(t) for t in tails]
        device = next(self.model.parameters()).device
        extra = {}
        if cache is not None:
            extra["cache"] = copy.deepcopy(cache)
            extra["cache"].batch_repeat_interleave(len(rows))
        with torch.no_grad():
            output = self.model.generate(
                input_ids=torch.tensor(input_ids, device=device),
                attention_mask=torch.tensor(mask, device=device), do_sample=False,
                max_new_tokens=self.max_new_tokens, pad_token_id=pad, **extra)
        return self.tokenizer.batch_decode(output[:, len(input_ids[0]):],
                                           skip_special_tokens=True)

    def _load(self) -> None:
        from sku.evaluation.generate import load_generator

        log.info("loading the judge model %s", self.folder)
        with loading(self.folder, "the judge model", JudgeError):
            self.model, self.tokenizer = load_generator(self.folder, None, self.folder, "auto")
