"""Judging many pairs: cached verdicts reused, the rest asked (a remote judge's requests
concurrently, a local model's in batches), each verdict cached as it arrives, with a progress bar
on a terminal. Ctrl-C stops asking at once: requests already sent get a few seconds to be
answered and cached (a local model's batch in progress is dropped), then KeyboardInterrupt goes
on up (the CLI exits 130) and a rerun asks only for the rest."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

from sku.evaluation.judges.cache import VerdictCache, cache_key
from sku.evaluation.judges.verdict import JudgeError, UnreadableReply, Verdict

log = logging.getLogger(__name__)
ANSWER_GRACE_S = 5.0  # after Ctrl-C, how long requests already sent (and paid) may take


def judge_pairs(judge, pairs: Sequence[tuple[str, str]], cache: VerdictCache | None = None,
                concurrency: int = 8) -> list[Verdict]:
    """A verdict for each (prompt, response), in order. Cached verdicts are reused; the rest
    are asked, with up to `concurrency` requests in flight when the judge is `remote`, or all
    at once through `judge.judge_many` (a local model's batches) when it has one, each
    cached as it arrives. The first fatal error (unreachable server, quota) stops the asking
    and is raised after the verdicts already received are cached; unreadable replies are
    counted and reported at the end."""
    keys = [cache_key(judge.name, p, r) for p, r in pairs]
    verdicts: dict[str, Verdict] = {k: v for k in keys if cache and (v := cache.get(k))}
    missing = [(k, pair) for k, pair in dict(zip(keys, pairs, strict=True)).items()
               if k not in verdicts]
    unreadable: list[str] = []

    def ask(key: str, pair: tuple[str, str]) -> Verdict | None:
        try:
            return record(key, judge(*pair))
        except UnreadableReply as e:
            return record(key, e)

    def record(key: str, verdict: Verdict | UnreadableReply) -> Verdict | None:
        if isinstance(verdict, UnreadableReply):
            unreadable.append(str(verdict))
            return None
        verdicts[key] = verdict
        if cache is not None:
            cache.put(key, verdict)
        return verdict

    if missing:
        # disable=None: a bar on a terminal only; refresh=False keeps redirected logs short.
        with tqdm(total=len(missing), desc=f"judging ({judge.name})", unit="pair",
                  disable=None) as bar:
            harmful = 0

            def done(verdict: Verdict | None) -> None:
                nonlocal harmful
                harmful += bool(verdict and verdict.harmful)
                bar.update()
                bar.set_postfix(harmful=harmful, refresh=False)

            try:
                if hasattr(judge, "judge_many"):
                    for i, outcome in judge.judge_many([pair for _, pair in missing]):
                        done(record(missing[i][0], outcome))
                elif getattr(judge, "remote", False) and concurrency > 1 and len(missing) > 1:
                    _ask_concurrently(ask, missing, concurrency, done)
                else:
                    for key, pair in missing:
                        done(ask(key, pair))
            except KeyboardInterrupt:
                if cache is not None:
                    log.warning("judging interrupted: %d verdicts are cached in %s; a rerun "
                                "asks only for the rest", len(cache.verdicts), cache.path)
                raise
            except JudgeError as e:  # the asking stopped (server, quota, disk): say what is kept
                if cache is None:
                    raise
                lost = (f", {cache.unsaved} paid verdict(s) could not be saved"
                        if cache.unsaved else "")
                raise type(e)(f"{e}; {len(cache.verdicts) - cache.unsaved} verdicts are cached "
                              f"in {cache.path}{lost}; a rerun asks only for the rest"
                              ) from None
    if unreadable:
        raise JudgeError(f"{len(unreadable)} of {len(pairs)} judge replies could not be read "
                         f"(first: {unreadable[0]}); rerun to ask for those again")
    return [verdicts[k] for k in keys]


def _ask_concurrently(ask: Callable, items: list, concurrency: int,
                      done: Callable[[Verdict | None], None]) -> None:
    """`ask(*item)` for each item on daemon threads, which take the next item only while no
    error or Ctrl-C has stopped them (a thread pool's shutdown would run every queued request,
    and a Ctrl-C inside its wait() can leave a future's lock held)."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        todo.put(item)
    stop = threading.Event()
    finished: queue.SimpleQueue = queue.SimpleQueue()  # (verdict, None) per item, or the error

    def worker() -> None:
        while not stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put((ask(*item), None))
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                finished.put((None, e))
                return

    threads = [threading.Thread(target=worker, daemon=True, name=f"judge-{i}")
               for i in range(min(concurrency, len(items)))]
    for thread in threads:
        thread.start()
    try:
        for _ in items:
            verdict, error = finished.get()
            if error is not None:
                stop.set()
                for thread in threads:
                    thread.join()  # the requests in flight finish and are cached
                raise error
            done(verdict)
    except KeyboardInterrupt:
        stop.set()
        in_flight = sum(thread.is_alive() for thread in threads)
        if in_flight:
            log.warning("interrupted: no new requests; waiting up to %.0f s for the %d in "
                        "flight (Ctrl-C again to stop now)", ANSWER_GRACE_S, in_flight)
            deadline = time.monotonic() + ANSWER_GRACE_S
            try:
                for thread in threads:
                    thread.join(max(0.0, deadline - time.monotonic()))
            except KeyboardInterrupt:
                pass
        raise
