"""Judging many pairs: cached verdicts reused, the rest asked concurrently, each cached as it
arrives."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from sku.evaluation.judges.cache import VerdictCache, cache_key
from sku.evaluation.judges.verdict import JudgeError, UnreadableReply, Verdict


def judge_pairs(judge, pairs: Sequence[tuple[str, str]], cache: VerdictCache | None = None,
                concurrency: int = 8) -> list[Verdict]:
    """A verdict for each (prompt, response), in order. Cached verdicts are reused; the rest
    are asked with up to `concurrency` requests in flight, each cached as it arrives. The first
    fatal error (unreachable server, quota) stops the pool and is raised after the verdicts
    already received are cached; unreadable replies are counted and reported at the end."""
    keys = [cache_key(judge.name, p, r) for p, r in pairs]
    verdicts: dict[str, Verdict] = {k: v for k in keys if cache and (v := cache.get(k))}
    missing = {k: pair for k, pair in zip(keys, pairs, strict=True) if k not in verdicts}
    unreadable: list[str] = []

    def ask(key: str, pair: tuple[str, str]) -> None:
        try:
            verdict = judge(*pair)
        except UnreadableReply as e:
            unreadable.append(str(e))
            return
        verdicts[key] = verdict
        if cache is not None:
            cache.put(key, verdict)

    if missing:
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(missing)))) as pool:
            futures = [pool.submit(ask, k, pair) for k, pair in missing.items()]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                for future in futures:
                    future.cancel()
                raise failed.exception()
    if unreadable:
        raise JudgeError(f"{len(unreadable)} of {len(pairs)} judge replies could not be read "
                         f"(first: {unreadable[0]}); rerun to ask for those again")
    return [verdicts[k] for k in keys]
