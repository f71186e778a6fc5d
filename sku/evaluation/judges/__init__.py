"""Harmfulness judges for (prompt, response) pairs, by name: `openai`, the paper's few-shot LLM
judge over any OpenAI-compatible server, and `keyword`, an offline heuristic. Each returns a
Verdict naming one of Table 3's seven kinds; judge_pairs judges many pairs through a cache.

    verdict.py  the kinds, Verdict, the errors      prompt.py   the few-shot prompt
    parse.py    reading a judge's reply             openai.py   the LLM judge
    keyword.py  the offline heuristic               cache.py    the append-only verdict cache
    batch.py    many pairs: cache, concurrency, progress, Ctrl-C
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sku.evaluation.judges.batch import judge_pairs
from sku.evaluation.judges.cache import VerdictCache, cache_key
from sku.evaluation.judges.keyword import KeywordJudge
from sku.evaluation.judges.openai import OpenAIJudge
from sku.evaluation.judges.parse import parse_verdict
from sku.evaluation.judges.prompt import PROMPT_VERSION, build_messages
from sku.evaluation.judges.verdict import (
    CATEGORIES,
    HARMFUL_CATEGORIES,
    JudgeError,
    UnreadableReply,
    Verdict,
)

__all__ = ["CATEGORIES", "HARMFUL_CATEGORIES", "JUDGES", "PROMPT_VERSION", "JudgeError",
           "KeywordJudge", "OpenAIJudge", "UnreadableReply", "Verdict", "VerdictCache",
           "build_messages", "cache_key", "judge_pairs", "make_judge", "parse_verdict",
           "read_words"]


def read_words(path: str | Path) -> list[str]:
    """A word list: one word or phrase per line; blank lines and `#` comments skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise JudgeError(f"{path}: cannot read the keyword judge's word list ({e})") from None
    return [word for line in lines if (word := line.split("#", 1)[0].strip())]


def _keyword(model: str | None, base_url: str | None, max_retries: int) -> KeywordJudge:
    return KeywordJudge(read_words(model) if model else ())


def _openai(model: str | None, base_url: str | None, max_retries: int) -> OpenAIJudge:
    if not model:
        raise JudgeError("--judge openai needs --judge-model (e.g. gpt-4o)")
    return OpenAIJudge(model, base_url=base_url, max_retries=max_retries)


# Name -> factory(model, base_url, max_retries). For `keyword` the model is optional: a word
# list (read_words) of what is harmful in a domain its lexicon does not know.
_FACTORIES: dict[str, Callable] = {"openai": _openai, "keyword": _keyword}
JUDGES = tuple(_FACTORIES)


def make_judge(name: str, model: str | None = None, base_url: str | None = None,
               max_retries: int = 6) -> Callable[[str, str], Verdict]:
    if name not in _FACTORIES:
        raise JudgeError(f"judge {name!r}: expected one of {', '.join(JUDGES)}")
    return _FACTORIES[name](model, base_url, max_retries)
