"""The `sku` command: unlearn, evaluate and report, or run the whole study on a tiny model.

`sku unlearn` (one method, stage 1 and stage 2), `sku demo`, and the evaluation's `sku eval`,
`sku judge` and `sku report` (sku/eval_cli.py).

Errors in the input print one line, `sku: error: …`, and exit with status 1.
Multi-GPU: `accelerate launch --config_file examples/accelerate/{ddp,fsdp2}.yaml -m sku
unlearn …` (DDP, or FSDP2 for models that outgrow one GPU; DeepSpeed is refused for now).
"""

from __future__ import annotations

import argparse
import sys

from sku.errors import SkuError
from sku.eval_cli import register as register_eval
from sku.methods import METHODS
from taskvec import TaskVecError


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated step numbers") from None


def _add_unlearn(commands) -> None:
    from sku.config import DTYPES, recipe_names

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
    register_eval(commands)
    return parser


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # ours shows the training; theirs only shard writes


def run_demo(args: argparse.Namespace) -> None:
    from sku.demo import run_demo

    _quiet_transformers()
    run_demo(args.out, quick=args.quick, force=args.force)


def run_unlearn(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from sku.config import RECIPE_KEYS, resolve_config
    from sku.unlearn import unlearn

    _quiet_transformers()
    values = vars(args)
    required = {k: values[k] for k in ("method", "model", "forget_data", "normal_data", "out")}
    overrides = {k: values[k] for k in RECIPE_KEYS}
    config = resolve_config(required, args.config, overrides)
    final = unlearn(config, resume=args.resume, force=args.force)
    if PartialState().is_main_process:
        print(f"sku unlearn: {config.method} finished; the final model is in {final}")


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
