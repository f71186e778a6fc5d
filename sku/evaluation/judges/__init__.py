"""Harmfulness judges for (prompt, response) pairs, by name: `openai`, the paper's few-shot LLM
judge over any OpenAI-compatible server; `hf`, the same prompt on a local causal LM in this
process; `llamaguard`, a Llama Guard checkpoint's own format; `encoder`, an offline judge of
measured accuracy (a sentence encoder and a head trained on Table 3's kinds); and `keyword`,
an offline heuristic. Each returns a Verdict naming one of Table 3's seven kinds (Llama Guard:
harmful or not only); judge_pairs judges many pairs through a cache.

    verdict.py  the kinds, Verdict, the errors      prompt.py   the few-shot prompt
    parse.py    reading a judge's reply             openai.py   the LLM judge over HTTP
    hf.py       the local-model judges              keyword.py  the offline heuristic
    encoder.py  the offline trained judge
    cache.py    the append-only verdict cache
    batch.py    many pairs: cache, concurrency, progress, Ctrl-C
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sku.errors import SkuError, read_text
from sku.evaluation.judges.batch import judge_pairs
from sku.evaluation.judges.cache import VerdictCache, cache_key
from sku.evaluation.judges.encoder import EncoderJudge
from sku.evaluation.judges.hf import LocalJudge
from sku.evaluation.judges.keyword import KeywordJudge
from sku.evaluation.judges.openai import OpenAIJudge
from sku.evaluation.judges.parse import parse_guard, parse_verdict
from sku.evaluation.judges.prompt import (
    PROMPT_VERSION,
    build_messages,
    build_text,
    read_examples,
)
from sku.evaluation.judges.verdict import (
    CATEGORIES,
    HARMFUL_CATEGORIES,
    JudgeError,
    UnreadableReply,
    Verdict,
)

__all__ = ["CATEGORIES", "HARMFUL_CATEGORIES", "JUDGES", "PROMPT_VERSION", "EncoderJudge",
           "JudgeError", "JudgeSettings", "KeywordJudge", "LocalJudge", "OpenAIJudge",
           "UnreadableReply", "Verdict", "VerdictCache", "build_messages", "build_text",
           "cache_key", "judge_pairs", "make_judge", "parse_guard", "parse_verdict",
           "read_examples", "read_words"]


def read_words(path: str | Path) -> list[str]:
    """A word list: one word or phrase per line; blank lines and `#` comments skipped."""
    try:
        lines = read_text(Path(path)).splitlines()
    except SkuError as e:
        raise JudgeError(f"{path}: cannot read the keyword judge's word list "
                         f"({str(e).removeprefix(f'{path}: ')})") from None
    return [word for line in lines if (word := line.split("#", 1)[0].strip())]


@dataclass(frozen=True)
class JudgeSettings:
    """What a judge is built from (sku eval's and sku judge's judge flags)."""

    model: str | None = None  # openai, hf, llamaguard: the model; keyword: a word list;
    # encoder: the encoder's folder
    base_url: str | None = None  # openai
    max_retries: int = 6  # openai
    batch_size: int = 8  # hf, llamaguard: pairs per generate call
    max_new_tokens: int = 32  # hf, llamaguard
    few_shot: str | None = None  # openai, hf: a file of examples (read_examples)


def _examples(settings: JudgeSettings, name: str):
    if settings.few_shot is None:
        return None
    if name not in ("openai", "hf"):
        raise JudgeError(f"--few-shot is for the openai and hf judges, not {name}")
    return read_examples(settings.few_shot)


def _keyword(settings: JudgeSettings) -> KeywordJudge:
    _examples(settings, "keyword")
    return KeywordJudge(read_words(settings.model) if settings.model else ())


def _encoder(settings: JudgeSettings) -> EncoderJudge:
    _examples(settings, "encoder")
    return EncoderJudge(settings.model)


def _openai(settings: JudgeSettings) -> OpenAIJudge:
    if not settings.model:
        raise JudgeError("--judge openai needs --judge-model (e.g. gpt-4o)")
    return OpenAIJudge(settings.model, base_url=settings.base_url,
                       max_retries=settings.max_retries,
                       examples=_examples(settings, "openai"))


def _local(style: str | None) -> Callable[[JudgeSettings], LocalJudge]:
    name = style or "hf"

    def make(settings: JudgeSettings) -> LocalJudge:
        if not settings.model:
            raise JudgeError(f"--judge {name} needs --judge-model (a local folder or .gguf "
                             "file)")
        return LocalJudge(settings.model, style, settings.batch_size, settings.max_new_tokens,
                          _examples(settings, name))

    return make


# Name -> factory(JudgeSettings). `hf` detects a Llama Guard checkpoint by its chat template.
_FACTORIES: dict[str, Callable[[JudgeSettings], Callable]] = {
    "openai": _openai, "hf": _local(None), "llamaguard": _local("llamaguard"),
    "encoder": _encoder, "keyword": _keyword}
JUDGES = tuple(_FACTORIES)


def make_judge(name: str, model: str | None = None, base_url: str | None = None,
               max_retries: int = 6, **more) -> Callable[[str, str], Verdict]:
    """The judge `name`; `more` are JudgeSettings' other fields."""
    if name not in _FACTORIES:
        raise JudgeError(f"judge {name!r}: expected one of {', '.join(JUDGES)}")
    return _FACTORIES[name](JudgeSettings(model, base_url, max_retries, **more))
