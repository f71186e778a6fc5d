"""SKU stage-1 step: memory and speed, ours against the official recipe.

    python bench/bench_unlearn_step.py            # LLaMA-2-7B shape on one CUDA GPU (H100/H200)
    python bench/bench_unlearn_step.py --tiny     # a tiny shape: checks the script, CPU included
    python bench/bench_unlearn_step.py --model SmolLM2-135M-Instruct.Q4_1.gguf   # real, CPU

The recipes, LoRA r 32, α 16 on q_proj and v_proj (the paper's recipe) in each:

  ours          one model; the KL reference is the same model with its adapter disabled;
                CE and KL fused from hidden states (sku.train.loss.TrainingModule, sku_kernels)
  ours + ckpt   the same with gradient checkpointing
  official      the official recipe: two fp32 models (its quantisation keys do not exist), full
                logits, softmax KL over every position

One SKU step holds, per example, its forget row, k mismatch rows and a normal row, in one
forward and one backward, as the official code holds them. Rows are random token ids (timing
does not depend on them): prompt (first half) + answer.

Random shapes (GPU, --tiny): a LLaMA-2-7B-shaped model with random weights (no download), bf16
(fp32 on CPU), batch 2 × 512 tokens, k = 5: 14 rows (7168 tokens). Reported: peak GPU memory
(official when it fits) and tokens/s; the official floor is its weights alone, 2 × 4 bytes ×
parameters. Without CUDA (and without --tiny) the script says so and exits 0.

--model (a folder, hub id or .gguf file, converted once as `sku unlearn` converts it), on CPU:
batch 2 × 256 tokens, k = 2 (the SmolLM2 study's): 8 rows (2048 tokens). Ours loads the model as
`sku unlearn --lora` does on CPU (sku.train.model.load_model: float32, the compute dtype `auto`
picks there); official loads it twice in fp32. Each recipe runs in its own process, so its
peak RSS is its own, and the recipes alternate over --rounds (reversed every other round) so a
shared machine's load falls on all of them alike. Reported: seconds per step (median over the
rounds' timed steps) and peak RSS; the floors are the same processes loading their models and
taking no step, and one that only imports the libraries.

Results go to bench/results/unlearn_step[_tiny|_<model>_cpu].md (temporary file, fsync, rename).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS, in_child, machine, peak_rss, table, versions, write_results

from sku.data.encoding import Encoded
from sku.data.readers import Pair
from sku.train.batch import Row, collate
from sku.train.loss import TrainingModule
from sku.train.methods import METHODS
from sku.train.teacher import TeacherMode

EPS = (2.5, 1.0, 0.5)  # LLaMA2-7B, paper Table 4


@dataclass(frozen=True)
class Shape:
    batch: int  # examples per step
    k: int  # mismatch rows per example
    seq: int  # tokens per row: prompt (first half) + answer

    @property
    def rows(self) -> int:
        return self.batch * (self.k + 2)

    @property
    def tokens(self) -> int:
        return self.rows * self.seq


RANDOM_SHAPE = Shape(batch=2, k=5, seq=512)  # the paper's k and the official max length
MODEL_SHAPE = Shape(batch=2, k=2, seq=256)  # the SmolLM2 study's k; a short prompt + answer
RECIPES = {"ours": "ours: one fp32 model, LoRA, fused CE/KL",
           "ours-ckpt": "ours + gradient checkpointing",
           "official": "official: 2 × fp32 models, full logits"}


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=RANDOM_SHAPE.seq)
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096)


def random_model(config, dtype, device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.config.use_cache = False
    return model


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=32, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def sku_rows(vocab: int, shape: Shape):
    """The rows of one SKU step, with SKU's weights, as sku's collate builds them."""
    terms = METHODS["sku"].active_terms(EPS)
    generator = torch.Generator().manual_seed(0)
    rows, encoded = [], []
    for _ in range(shape.batch):
        for term_index, (term, _) in enumerate(terms):
            count = shape.k if term.rows == "mismatch" else 1
            for _ in range(count):
                rows.append(Row(Pair("", "", 0), term_index, count, 0))
                ids = torch.randint(4, vocab, (shape.seq,), generator=generator).tolist()
                encoded.append(Encoded(ids, shape.seq // 2))
    return collate(rows, encoded, terms, batch_size=shape.batch, pad_token_id=0), terms


def measure(step, device, steps: int, warmup: int = 1) -> tuple[float | None, list[float]]:
    """(peak GPU memory GiB or None on CPU, seconds of each of `steps` steps after `warmup`)."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return peak, seconds


def ours_step(model, compute: torch.dtype, shape: Shape, device):
    """One optimizer step of `sku unlearn` on a LoRA `model` (its teacher: itself with the
    adapter disabled), as sku.train.loop takes it."""
    fused = TrainingModule(model, TeacherMode.CACHE, compute).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    batch, _ = sku_rows(model.config.vocab_size, shape)
    inputs = batch.inputs(device)

    def step():
        fused(**inputs).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def official_step(model, pretrained, shape: Shape, device):
    """The official utils.py losses: per-row answer CE from full logits (bad and random
    batches) and softmax KL over all positions against a second, frozen model; one backward."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    batch, _ = sku_rows(model.config.vocab_size, shape)
    ids = batch.input_ids.to(device)
    answer = shape.seq // 2
    per_example = ["forget"] + ["mismatch"] * shape.k + ["normal"]  # sku_rows' order
    rows_of = {kind: [r for r in range(len(ids)) if per_example[r % (shape.k + 2)] == kind]
               for kind in ("forget", "mismatch", "normal")}

    def answer_ce(rows):
        logits = model(input_ids=ids[rows]).logits[:, answer - 1:-1]
        return F.cross_entropy(logits.flatten(0, 1), ids[rows, answer:].flatten())

    def step():
        bad, rand = answer_ce(rows_of["forget"]), answer_ce(rows_of["mismatch"])
        q = torch.softmax(model(input_ids=ids[rows_of["normal"]]).logits, -1)
        with torch.no_grad():
            p = torch.softmax(pretrained(input_ids=ids[rows_of["normal"]]).logits, -1)
        kl = -(p * torch.log((p + 1e-12) / q)).sum(-1).mean()
        (EPS[0] * bad + EPS[1] * rand + EPS[2] * kl).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_ours(config, device, steps: int, checkpointing: bool):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(config, dtype, device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return measure(ours_step(with_lora(model), dtype, RANDOM_SHAPE, device), device, steps)


def bench_official(config, device, steps: int):
    model = with_lora(random_model(config, torch.float32, device))
    pretrained = random_model(config, torch.float32, device).eval()
    return measure(official_step(model, pretrained, RANDOM_SHAPE, device), device, steps)


def parameters_of(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in random_model(config, torch.float32, "meta").parameters())


def run(label: str, function, *args) -> tuple[str, str, str, str]:
    try:
        peak, seconds = function(*args)
        tokens_per_s = RANDOM_SHAPE.tokens * len(seconds) / sum(seconds)
        return (label, "n/a (CPU)" if peak is None else f"{peak:.1f}", f"{tokens_per_s:.0f}",
                f"{statistics.median(seconds):.3f}")
    except torch.cuda.OutOfMemoryError:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        return label, f"OOM (> {total:.0f})", "—", "—"
    except Exception as error:  # one recipe's failure must not cost the others' rows
        traceback.print_exc()
        return label, f"failed: {type(error).__name__}", "—", "—"
    finally:
        gc.collect()  # a model held in reference cycles would count in the next recipe's peak
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def bench_random(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("bench_unlearn_step: skipped: needs a CUDA GPU (H100/H200) for the "
              "LLaMA-2-7B shape; `--tiny` checks the script on CPU; `--model PATH` measures a "
              "real model on CPU")
        return 0
    config = llama_config(args.tiny)
    params = parameters_of(config)
    shape = RANDOM_SHAPE
    ours = "ours: one bf16 model (fp32 on CPU), LoRA, fused CE/KL"
    rows = [run(ours, bench_ours, config, device, args.steps, False),
            run("ours + gradient checkpointing", bench_ours, config, device, args.steps, True)]
    if not args.skip_official:
        rows.append(run("official: 2 × fp32 models, full logits", bench_official, config,
                        device, args.steps))
    rows.append(("official floor: 2 fp32 copies of the weights", f"{2 * 4 * params / 2**30:.1f}",
                 "—", "—"))
    command = "python bench/bench_unlearn_step.py" + (" --tiny" if args.tiny else "")
    text = "\n".join([
        f"# SKU stage-1 step{' (tiny shape)' if args.tiny else ''}, {machine(device)}", "",
        f"- model: LLaMA-2-7B shape ({params / 1e9:.2f} B parameters)" if not args.tiny
        else f"- model: tiny LLaMA ({params / 1e6:.2f} M parameters)",
        f"- step: batch {shape.batch} × {shape.seq} tokens; per example 1 forget + {shape.k} "
        f"mismatch + 1 normal row = {shape.rows} rows; LoRA r 32, α 16 on q_proj, v_proj; "
        f"ε = {EPS}",
        f"- versions: {versions('torch', 'transformers', 'peft')}",
        f"- command: `{command}`; {args.steps} timed steps after 1 warm-up; "
        f"date {datetime.date.today()}", "",
        *table(["recipe", "peak GPU memory GiB", "tokens/s", "s/step (median)"], rows,
               right=(1, 2, 3)), ""])
    print(text)
    name = "unlearn_step_tiny.md" if args.tiny else "unlearn_step.md"
    write_results(args.out or RESULTS / name, text)
    return 0


def parameter_bytes(*models) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def one_recipe(source: str, recipe: str, steps: int, warmup: int) -> dict:
    """In a child process: load `recipe`'s models from `source` on CPU and take `warmup` and
    `steps` timed steps (none when `steps` is 0: the floor); its seconds and peak RSS."""
    import peft  # noqa: F401  (imported by every recipe: part of each floor)
    from transformers import AutoModelForCausalLM

    from sku.dtypes import resolve_dtype
    from sku.train.config import UnlearnConfig
    from sku.train.model import load_model, master_dtype

    device = torch.device("cpu")
    step, models = None, []
    if recipe in ("ours", "ours-ckpt"):
        compute = resolve_dtype("auto", device)
        config = UnlearnConfig(method="sku", model=source, forget_data="-", normal_data="-",
                               out="-", lora=True, gradient_checkpointing=recipe == "ours-ckpt")
        models = [load_model(config, compute, master_dtype(compute, frozen_base=True), device)]
        step = ours_step(models[0], compute, MODEL_SHAPE, device)
    elif recipe == "official":
        def fp32():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            model.config.use_cache = False
            return model

        models = [with_lora(fp32()), fp32().eval()]
        step = official_step(*models, MODEL_SHAPE, device)
    seconds = measure(step, "cpu", steps, warmup)[1] if step is not None and steps else []
    return {"seconds": seconds, "peak_rss": peak_rss(), "weights": parameter_bytes(*models)}


def results_name(model: str) -> str:
    """unlearn_step_<the model's first word>_cpu.md: smollm2 for SmolLM2-135M-Instruct.*"""
    word = re.split(r"[-_.]", Path(model.rstrip("/")).name)[0].lower() or "model"
    return f"unlearn_step_{word}_cpu.md"


def bench_model(args) -> int:
    from sku.train.model import model_source

    source = model_source(args.model)  # a .gguf is converted here, once, before any child
    command = [__file__, "--model", source, "--steps", str(args.steps), "--warmup",
               str(args.warmup)]
    load = [os.getloadavg()[0]]
    runs = {recipe: [] for recipe in RECIPES}
    for round_ in range(args.rounds):
        order = list(RECIPES) if round_ % 2 == 0 else list(RECIPES)[::-1]
        for recipe in order:
            print(f"round {round_ + 1}/{args.rounds}: {recipe}", file=sys.stderr, flush=True)
            runs[recipe].append(in_child(*command, "--recipe", recipe))
            load.append(os.getloadavg()[0])
    floors = {}
    for recipe in ("imports", "ours", "official"):
        print(f"floor: {recipe}", file=sys.stderr, flush=True)
        floors[recipe] = in_child(__file__, "--model", source, "--steps", "0", "--recipe", recipe)

    def summary(results: list[dict]) -> tuple[float | None, float, int]:
        seconds = [s for r in results for s in r["seconds"]]
        return (statistics.median(seconds) if seconds else None,
                max(r["peak_rss"] for r in results), results[0]["weights"])

    measured = {recipe: summary(results) for recipe, results in runs.items()}
    official_s, official_rss, _ = measured["official"]
    rows = []
    for recipe, (seconds, rss, weights) in measured.items():
        rows.append([RECIPES[recipe], f"{seconds:.2f}", f"{rss / 2**20:.0f}",
                     f"{weights / 2**20:.0f}", f"{rss / official_rss:.2f}",
                     f"{seconds / official_s:.2f}"])
    labels = {"imports": "floor: python + torch, transformers, peft, sku imported",
              "ours": "floor: ours' model loaded, no step",
              "official": "floor: official's 2 models loaded, no step"}
    for recipe, result in floors.items():
        _, rss, weights = summary([result])
        rows.append([labels[recipe], "—", f"{rss / 2**20:.0f}", f"{weights / 2**20:.0f}",
                     f"{rss / official_rss:.2f}", "—"])
    shape = MODEL_SHAPE
    timed = args.rounds * args.steps
    text = "\n".join([
        f"# SKU stage-1 step on {Path(args.model).name}, CPU", "",
        f"- machine: {machine()}; torch threads {torch.get_num_threads()}; 1-minute load "
        f"average {min(load):.1f}–{max(load):.1f} during the run (the machine was shared with "
        "other work: times are inflated for every recipe, roughly alike, since they alternate)",
        f"- model: `{args.model}` (loaded from `{source}`); {measured['ours'][2] / 4e6:.1f} M "
        "fp32 parameters in ours (LoRA included)",
        f"- step: batch {shape.batch} × {shape.seq} tokens (prompt {shape.seq // 2} + answer "
        f"{shape.seq // 2}, random token ids); per example 1 forget + {shape.k} mismatch + 1 "
        f"normal row = {shape.rows} rows ({shape.tokens} tokens) in one forward and backward; "
        f"LoRA r 32, α 16 on q_proj, v_proj; AdamW; ε = {EPS}",
        f"- each recipe in its own process, {args.rounds} rounds in alternating order; per "
        f"round {args.warmup} warm-up + {args.steps} timed steps; s/step is the median of "
        f"{timed} timed "
        "steps; peak RSS (ru_maxrss) the largest of the rounds, loading included; weights: "
        "bytes of the parameters the process holds",
        f"- versions: {versions('torch', 'transformers', 'peft', 'gguf')}",
        f"- command: `python bench/bench_unlearn_step.py --model {args.model} --steps "
        f"{args.steps} --rounds {args.rounds} --warmup {args.warmup}`; "
        f"date {datetime.date.today()}", "",
        *table(["recipe", "s/step", "peak RSS MiB", "weights MiB", "RSS × official",
                "time × official"], rows, right=range(1, 6)), ""])
    print(text)
    write_results(args.out or RESULTS / results_name(args.model), text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random shape; runs on CPU too")
    parser.add_argument("--model", help="a real model (folder, hub id or .gguf) on CPU")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per measurement (per round with --model)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2,
                        help="with --model: processes per recipe, in alternating order")
    parser.add_argument("--skip-official", action="store_true", help="random shapes only")
    parser.add_argument("--out", type=Path, help="results file (default: in bench/results/)")
    parser.add_argument("--recipe", choices=["imports", *RECIPES], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recipe:  # a child process of --model
        print(json.dumps(one_recipe(args.model, args.recipe, args.steps, args.warmup)))
        return 0
    return bench_model(args) if args.model else bench_random(args)


if __name__ == "__main__":
    sys.exit(main())
