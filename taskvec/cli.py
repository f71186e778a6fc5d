"""The `taskvec` command line: thin argparse over the Python API."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from taskvec.errors import InterruptedAfterWrite, TaskVecError, interrupt_handled


def path_argument(text: str) -> str:
    """A path argument: an empty one would mean the current folder, which no one means."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return text


def _writer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=path_argument,
                   help="output folder (refused if it exists)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--max-shard-size", help="re-shard the output, e.g. 2GB (default: as the base)")
    p.add_argument("--buffer-mb", type=float,
                   help="streaming block size in MB of fp32 (default 2; memory scales with it)")
    p.add_argument("--allow-vocab-mismatch", action="store_true",
                   help="edit only the rows both sides share when vocabulary sizes differ")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors follow the one-line rule too
        print(f"taskvec: error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="taskvec", description="Streaming task vectors for safetensors checkpoints and "
        "LoRA adapters. Models may be folders, Hugging Face ids in the local cache, or aliases "
        "(llama2-7b, llama2-13b, opt-2.7b).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("diff", help="V = T − B")
    p.add_argument("--base", required=True, type=path_argument)
    p.add_argument("--tuned", required=True, type=path_argument,
                   help="full checkpoint or LoRA adapter folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the vector (default: the base's)")
    _writer_options(p)

    p = sub.add_parser("apply", help="O = B + Σ Sᵢ·Vᵢ")
    p.add_argument("--base", required=True, type=path_argument)
    p.add_argument("--vector", action="append", required=True, type=path_argument,
                   help="task vector or LoRA adapter folder (repeatable)")
    p.add_argument("--scale", action="append", type=float,
                   help="one scale, or one per --vector, in order (default 1; may be negative)")
    _writer_options(p)

    p = sub.add_parser("negate", help="O = B − L·(T − B); with --as-adapter, an adapter of −L·ΔW")
    p.add_argument("--base", type=path_argument, help="base model (not needed with --as-adapter)")
    p.add_argument("--tuned", required=True, type=path_argument,
                   help="full checkpoint or LoRA adapter folder")
    p.add_argument("--scale", type=float, default=1.0, help="L (λ in the SKU paper; default 1)")
    p.add_argument("--as-adapter", action="store_true",
                   help="write a negated LoRA adapter instead of a model")
    _writer_options(p)

    p = sub.add_parser("info", help="kind, tensors, dtypes, bytes, per-layer delta norms")
    p.add_argument("path", type=path_argument)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("verify", help="check headers, offsets, index coverage, finite values")
    p.add_argument("path", type=path_argument)
    return parser


def _print_info(result: dict) -> None:
    print(f"{result['path']}\n  kind     {result['kind']}\n  tensors  {result['tensors']}")
    print("  dtypes   " + ", ".join(f"{k} × {v}" for k, v in result["dtypes"].items()))
    print(f"  bytes    {result['bytes']:,}")
    if "layer_norms" in result:
        print("  delta Frobenius norm per layer:")
        for layer, norm in result["layer_norms"].items():
            print(f"    {layer:<40} {norm:.6g}")


def _run(args: argparse.Namespace) -> None:
    import taskvec

    writer = {"force": args.force, "max_shard_size": args.max_shard_size,
              "allow_vocab_mismatch": args.allow_vocab_mismatch} if hasattr(args, "out") else {}
    if getattr(args, "buffer_mb", None) is not None:
        writer["buffer_mb"] = args.buffer_mb
    if args.command == "diff":
        out = taskvec.diff(args.base, args.tuned, args.out, dtype=args.dtype, **writer)
    elif args.command == "apply":
        out = taskvec.apply(args.base, args.vector, args.out, scales=args.scale, **writer)
    elif args.command == "negate" and args.as_adapter:
        if args.base:
            raise TaskVecError("--as-adapter needs no --base: it writes an adapter, not a model")
        out = taskvec.negate_adapter(args.tuned, args.out, scale=args.scale, force=args.force)
    elif args.command == "negate":
        if not args.base:
            raise TaskVecError("negate needs --base (or --as-adapter for a LoRA adapter)")
        out = taskvec.negate(args.base, args.tuned, args.out, scale=args.scale, **writer)
    elif args.command == "info":
        result = taskvec.info(args.path)
        print(json.dumps(result, indent=2)) if args.json else _print_info(result)
        return
    else:
        result = taskvec.verify(args.path)
        print(f"ok: {result['path']}: {result['tensors']} tensors in {result['shards']} "
              f"file(s), {result['bytes']:,} bytes, all values finite")
        return
    print(f"wrote {out}")


_received = [signal.SIGINT]  # the signal that interrupted the run: Ctrl-C unless SIGTERM


def _interrupt(signum, frame):
    _received[0] = signum
    raise KeyboardInterrupt  # unwinds through the atomic writer, which removes its temporary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _run(args)
    except TaskVecError as e:
        print(f"taskvec: error: {e}", file=sys.stderr)
        return 1
    except InterruptedAfterWrite as e:
        print(f"taskvec: interrupted after {e.out} was written in full (only the removal of "
              "the previous output was cut short; the next run to it finishes that)",
              file=sys.stderr)
        interrupt_handled()
        return 128 + _received[0]  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    except KeyboardInterrupt:
        print("taskvec: interrupted; nothing was written", file=sys.stderr)
        interrupt_handled()
        return 128 + _received[0]
    except OSError as e:  # disk full, permissions: still one line, still nothing half-written
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
        where = where or f"{args.command}"  # errors without a file are wrapped at their source
        print(f"taskvec: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
