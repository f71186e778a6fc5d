"""Logging and progress bars. Library code logs through `logging` under the "sku" logger (the
training code through `main_process_logger`, so one process speaks for all) and never prints;
the CLI installs one handler with `configure`, at the level -v/-q choose.

Progress bars write to stderr: on a terminal they redraw often; redirected to a file they
redraw rarely, so a log stays a readable list of lines (tqdm writes each redraw after a \\r).
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

_bars = {"enabled": True}  # -q turns bars off with the INFO lines


def configure(verbosity: int, command: str) -> None:
    """One stderr handler for every sku logger: -q warnings only and no bars, -v debug."""
    logger = logging.getLogger("sku")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"sku {command}: %(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.WARNING if verbosity < 0 else
                    logging.DEBUG if verbosity > 0 else logging.INFO)
    _bars["enabled"] = verbosity >= 0
    if verbosity < 0 or not sys.stderr.isatty():
        # transformers' and the hub's own bars ("Loading weights") redraw dozens of times per
        # model load: on a terminal they show progress, in a log they flood it. Read when
        # transformers is imported, which the CLI does after this.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _MainProcess(logging.LoggerAdapter):
    def log(self, level, msg, *args, **kwargs):
        from accelerate import PartialState

        if PartialState().is_main_process:
            kwargs.setdefault("stacklevel", 2)
            self.logger.log(level, msg, *args, **kwargs)


def main_process_logger(name: str) -> logging.LoggerAdapter:
    """A logger whose lines only accelerate's main process writes. accelerate's own
    get_logger does the same but prefixes every line with "[RANK 0]"."""
    return _MainProcess(logging.getLogger(name), {})


def progress(iterable=None, *, desc: str, total: int | None = None, disable: bool = False,
             **kwargs) -> tqdm:
    """A tqdm bar on stderr (disable: e.g. on processes other than the main one)."""
    terminal = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=disable or not _bars["enabled"],
                mininterval=0.1 if terminal else 30.0, file=sys.stderr, dynamic_ncols=terminal,
                **kwargs)
