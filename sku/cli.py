"""The `sku` command: unlearn, evaluate and report, or run the whole study on a tiny model.

`sku unlearn` (one method, stage 1 and stage 2), `sku demo`, and the evaluation's `sku eval`,
`sku judge` and `sku report`.

Errors in the input print one line, `sku: error: …`, and exit with status 1.
Multi-GPU: `accelerate launch --config_file examples/accelerate/{ddp,fsdp2}.yaml -m sku
unlearn …` (DDP, or FSDP2 for models that outgrow one GPU; DeepSpeed is refused for now).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sku.errors import SkuError
from sku.train.methods import METHODS
from taskvec import TaskVecError


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated step numbers") from None


def _add_unlearn(commands) -> None:
    from sku.train.config import DTYPES, recipe_names

    p = commands.add_parser(
        "unlearn", help="run one unlearning method (SKU or a baseline) end to end",
        description="Stage 1 (training) and stage 2 (negation) of one method into one folder. "
                    "Settings: defaults < --config recipe < flags.")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--model", required=True, help="original model: local folder or hub id")
    p.add_argument("--forget-data", required=True,
                   help="PKU-SafeRLHF: hub id[@revision] or .jsonl/.json/.csv/.parquet file")
    p.add_argument("--normal-data", required=True,
                   help="TruthfulQA (generation): hub id[@revision] or a local file")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", help=f"recipe YAML, or a shipped one: {', '.join(recipe_names())}")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-targets", help="comma-separated module names, e.g. q_proj,v_proj")
    quantize = p.add_mutually_exclusive_group()
    quantize.add_argument("--load-in-4bit", dest="quantize", action="store_const", const="4bit")
    quantize.add_argument("--load-in-8bit", dest="quantize", action="store_const", const="8bit")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, help="rows per optimizer step, all devices")
    p.add_argument("--micro-batch-size", type=int, help="rows per forward on one device")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--eps", type=float, nargs=3, metavar=("E1", "E2", "E3"),
                   help="weights of the three terms (SKU: GD, RD, PD); 0 drops a term")
    p.add_argument("--k", type=int, help="mismatch responses per prompt")
    p.add_argument("--scale", type=float, help="λ of stage 2: θ_o − λ·(θ_bad − θ_o)")
    p.add_argument("--save-steps", type=_steps, help="e.g. 200,400,600: snapshots for curves")
    p.add_argument("--checkpoint-every", type=int, help="steps between resumable checkpoints")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-length", type=int, help="tokens per row, prompt and answer")
    p.add_argument("--eval-size", type=int, help="prompts per evaluation split (default 100)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="compute dtype (auto: bfloat16 on a GPU, float32 on CPU); full "
                        "fine-tunes keep fp32 master weights under bf16/fp16 autocast")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--teacher", choices=["cache", "copy"],
                   help="full fine-tune's KL reference: cached hidden states or a frozen copy")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    p.set_defaults(handler=run_unlearn)


def _add_demo(commands) -> None:
    p = commands.add_parser(
        "demo", help="every method on a tiny model and bundled fictional data, in minutes on CPU")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="fewer steps: well under a minute")
    p.add_argument("--force", action="store_true", help="replace an existing demo folder")
    p.set_defaults(handler=run_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sku", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_unlearn(commands)
    _add_demo(commands)
    _add_eval(commands)
    _add_judge(commands)
    _add_report(commands)
    return parser


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # ours shows the training; theirs only shard writes


def run_demo(args: argparse.Namespace) -> None:
    from sku.demo.study import run_demo

    _quiet_transformers()
    run_demo(args.out, quick=args.quick, force=args.force)


def run_unlearn(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from sku.train.config import RECIPE_KEYS, resolve_config
    from sku.train.unlearn import unlearn

    _quiet_transformers()
    values = vars(args)
    required = {k: values[k] for k in ("method", "model", "forget_data", "normal_data", "out")}
    overrides = {k: values[k] for k in RECIPE_KEYS}
    config = resolve_config(required, args.config, overrides)
    final = unlearn(config, resume=args.resume, force=args.force)
    if PartialState().is_main_process:
        print(f"sku unlearn: {config.method} finished; the final model is in {final}")


def _judge_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--judge", required=required, choices=["openai", "keyword"],
                   help="openai: an LLM judge over any OpenAI-compatible server (the paper used "
                        "GPT-4); keyword: an offline heuristic")
    p.add_argument("--judge-model", help="the judge's model name, e.g. gpt-4o")
    p.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1 "
                                      "(key from OPENAI_API_KEY; any key if it needs none)")
    p.add_argument("--max-retries", type=int, default=6,
                   help="retries with backoff on 429, 5xx and lost connections")
    p.add_argument("--concurrency", type=int, default=8, help="judge requests in flight")


def _add_eval(commands) -> None:
    p = commands.add_parser(
        "eval", help="generate, judge and score a run's evaluation prompts",
        description="Responses of the original and the unlearned model (and, with --steps all, "
                    "of every snapshot) to the run's unlearned-harmful, unseen-harmful and "
                    "normal prompts: harmful rate, perplexity, BLEURT.")
    p.add_argument("--run", required=True, help="folder written by `sku unlearn`")
    p.add_argument("--model", help="evaluate this model folder instead of RUN/model")
    p.add_argument("--out", help="evaluation folder (default RUN/eval)")
    _judge_options(p, required=True)
    p.add_argument("--cache", help="judge verdict cache (default EVAL/judge-cache.jsonl)")
    p.add_argument("--ppl-model", help="reference LM for perplexity: hub id or folder "
                                       "(default openai-community/gpt2, as the paper)")
    p.add_argument("--ppl-condition", choices=["none", "prompt"], default="none",
                   help="score each response alone (default) or after its templated prompt")
    p.add_argument("--bleurt", help="BLEURT checkpoint: hub id or folder "
                                    "(default lucadiliello/bleurt-base-128)")
    p.add_argument("--steps", choices=["all", "none"], default="none",
                   help="all: also evaluate every snapshot in RUN/snapshots (metric curves)")
    p.add_argument("--original-cache", help="folder for the original model's responses, to "
                                            "share them between runs (default EVAL/generations)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--force", action="store_true", help="replace an existing metrics.json")
    p.set_defaults(handler=run_eval)


def _add_judge(commands) -> None:
    p = commands.add_parser(
        "judge", help="judge {prompt, response} rows for harmfulness (paper Table 3)",
        description="One output row per input row, in order, with harmful, category (a–g) "
                    "and the judge's reason.")
    p.add_argument("--input", required=True, help="JSONL of {prompt, response} rows")
    p.add_argument("--out", required=True, help="JSONL of verdicts")
    _judge_options(p, required=True)
    p.add_argument("--cache", help="verdict cache (default: judge-cache.jsonl beside --out)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=run_judge)


def _add_report(commands) -> None:
    p = commands.add_parser(
        "report", help="Table 1 (markdown and JSON) and Figure 3 (PNG) from evaluations",
        description="Reads RUN/eval/metrics.json, EVAL/metrics.json or a metrics.json file.")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_EVAL")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--force", action="store_true", help="replace an existing report")
    p.set_defaults(handler=run_report)


# ---------------------------------------------------------------------------------------------
# Handlers


def run_eval(args: argparse.Namespace) -> None:
    from transformers.utils import logging

    from sku.evaluation.evaluate import EvalOptions, evaluate_run
    from sku.evaluation.generate import Decoding
    from sku.run import RunFolder

    logging.disable_progress_bar()  # one line per model loaded is noise here

    decoding = Decoding(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        batch_size=args.batch_size)
    options = EvalOptions(
        judge=args.judge, judge_model=args.judge_model, base_url=args.base_url,
        max_retries=args.max_retries, concurrency=args.concurrency, judge_cache=args.cache,
        ppl_model=args.ppl_model, ppl_condition=args.ppl_condition, bleurt=args.bleurt,
        steps=args.steps == "all", model=args.model, original_cache=args.original_cache,
        decoding=decoding, dtype=args.dtype, force=args.force)
    out = Path(args.out) if args.out else RunFolder(args.run).eval
    metrics = evaluate_run(args.run, out, options)
    final = metrics["final"]
    rates = ", ".join(f"{name} {rate:.1%}" if (rate := final[name].get("harmful_rate")) is not None
                      else f"{name} n/a" for name in ("unlearned_harmful", "unseen_harmful"))
    print(f"sku eval: {metrics['method']}: harmful rate {rates} "
          f"(judge {metrics['judge']['name']}); metrics in {out / 'metrics.json'}")


def _read_rows(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SkuError(f"{path}: unreadable: {e.strerror or e}") from None
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

    from sku.evaluation.judge import VerdictCache, cache_key, judge_pairs, make_judge
    from taskvec import write_atomic

    source, out = Path(args.input), Path(args.out)
    if out.exists() and not args.force:
        raise SkuError(f"{out}: already exists (pass --force to replace it)")
    rows = _read_rows(source)
    judge = make_judge(args.judge, args.judge_model, args.base_url, args.max_retries)
    cache = None
    if args.judge != "keyword":
        cache = VerdictCache(args.cache or out.parent / "judge-cache.jsonl")
    pairs = [(row["prompt"], row["response"]) for row in rows]
    to_ask = len({cache_key(judge.name, *pair) for pair in pairs
                  if cache is None or cache.get(cache_key(judge.name, *pair)) is None})
    verdicts = judge_pairs(judge, pairs, cache, args.concurrency)
    write_atomic(out, "".join(json.dumps({**row, **asdict(verdict)}, ensure_ascii=False) + "\n"
                              for row, verdict in zip(rows, verdicts, strict=True)))
    harmful = sum(v.harmful for v in verdicts)
    print(f"sku judge: {len(rows)} rows ({to_ask} judged now, {len(rows) - to_ask} from the "
          f"cache), {harmful} harmful; verdicts in {out}")


def run_report(args: argparse.Namespace) -> None:
    from sku.evaluation.report import write_report

    report = write_report(args.inputs, args.out, force=args.force)
    print(f"sku report: {len(report['rows']) - 1} methods (judge {report['judge']}); "
          f"{Path(args.out) / 'report.md'}")


def main(argv=None) -> int:
    """Every subcommand sets `handler`; errors in the input are one line and status 1."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (SkuError, TaskVecError) as e:
        print(f"sku: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sku: interrupted", file=sys.stderr)
        return 130
    return 0
