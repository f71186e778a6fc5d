"""SKU stage-1 step: peak GPU memory and tokens/s, ours against the official recipe.

    python bench/bench_unlearn_step.py            # LLaMA-2-7B shape on one CUDA GPU (H100/H200)
    python bench/bench_unlearn_step.py --tiny     # a tiny shape: checks the script, CPU included

A LLaMA-2-7B-shaped model with random weights (no download), bf16, LoRA r 32, α 16 on q_proj and
v_proj (the paper's recipe), batch 2 × 512 tokens. One SKU step holds, per example, its forget
row, k = 5 mismatch rows and a normal row: 14 rows of 512 tokens (7168 tokens) in one forward
and one backward, as the official code holds them. Rows are prompt (first half) + answer.

  ours          one bf16 model; the KL reference is the same model with its adapter disabled;
                CE and KL fused from hidden states (sku.train.loss.TrainingModule, sku_kernels)
  ours + ckpt   the same with gradient checkpointing
  official      the official recipe: two fp32 models (its quantisation keys do not exist), full
                logits, softmax KL over every position; measured when it fits on the GPU
  official floor  its weights alone: 2 × 4 bytes × parameters

Without CUDA (and without --tiny) the script says so and exits 0. Results go to
bench/results/unlearn_step[_tiny].md (temporary file, fsync, rename).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch
import torch.nn.functional as F
from _common import RESULTS, machine, table, versions, write_results

from sku.data.encoding import Encoded
from sku.data.readers import Pair
from sku.train.batch import Row, collate
from sku.train.loss import TrainingModule
from sku.train.methods import METHODS
from sku.train.teacher import TeacherMode

BATCH, K, SEQ = 2, 5, 512
EPS = (2.5, 1.0, 0.5)  # LLaMA2-7B, paper Table 4


def llama_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=SEQ)
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


def sku_rows(vocab: int):
    """The 14 rows of one SKU step, with SKU's weights, as sku's collate builds them."""
    terms = METHODS["sku"].active_terms(EPS)
    generator = torch.Generator().manual_seed(0)
    rows, encoded = [], []
    for _ in range(BATCH):
        for term_index, (term, _) in enumerate(terms):
            count = K if term.rows == "mismatch" else 1
            for _ in range(count):
                rows.append(Row(Pair("", "", 0), term_index, count, 0))
                ids = torch.randint(4, vocab, (SEQ,), generator=generator).tolist()
                encoded.append(Encoded(ids, SEQ // 2))
    return collate(rows, encoded, terms, batch_size=BATCH, pad_token_id=0), terms


def measure(step, device, steps: int) -> tuple[float | None, float]:
    """(peak GPU memory GiB or None on CPU, tokens/s) over `steps` steps after a warm-up."""
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return peak, BATCH * (K + 2) * SEQ * steps / elapsed


def bench_ours(config, device, steps: int, checkpointing: bool):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(config, dtype, device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = with_lora(model)
    fused = TrainingModule(model, TeacherMode.CACHE, dtype).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    batch, _ = sku_rows(config.vocab_size)
    inputs = batch.inputs(device)

    def step():
        fused(**inputs).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, device, steps)


def bench_official(config, device, steps: int):
    """The official utils.py losses: per-row answer CE from full logits (bad and random
    batches) and softmax KL over all positions, two fp32 models, one backward."""
    model = with_lora(random_model(config, torch.float32, device))
    pretrained = random_model(config, torch.float32, device).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    batch, _ = sku_rows(config.vocab_size)
    ids = batch.input_ids.to(device)
    per_example = ["forget"] + ["mismatch"] * K + ["normal"]  # sku_rows' order
    rows_of = {kind: [r for r in range(len(ids)) if per_example[r % (K + 2)] == kind]
               for kind in ("forget", "mismatch", "normal")}

    def answer_ce(rows):
        logits = model(input_ids=ids[rows]).logits[:, SEQ // 2 - 1:-1]
        return F.cross_entropy(logits.flatten(0, 1), ids[rows, SEQ // 2:].flatten())

    def step():
        bad, rand = answer_ce(rows_of["forget"]), answer_ce(rows_of["mismatch"])
        q = torch.softmax(model(input_ids=ids[rows_of["normal"]]).logits, -1)
        with torch.no_grad():
            p = torch.softmax(pretrained(input_ids=ids[rows_of["normal"]]).logits, -1)
        kl = -(p * torch.log((p + 1e-12) / q)).sum(-1).mean()
        (EPS[0] * bad + EPS[1] * rand + EPS[2] * kl).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, device, steps)


def parameters_of(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in random_model(config, torch.float32, "meta").parameters())


def run(label: str, function, *args) -> tuple[str, str, str]:
    try:
        peak, tokens_per_s = function(*args)
        return label, "n/a (CPU)" if peak is None else f"{peak:.1f}", f"{tokens_per_s:.0f}"
    except torch.cuda.OutOfMemoryError:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        return label, f"OOM (> {total:.0f})", "—"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape; runs on CPU too")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--skip-official", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("bench_unlearn_step: skipped: needs a CUDA GPU (H100/H200) for the "
              "LLaMA-2-7B shape; `--tiny` checks the script on CPU")
        return 0
    config = llama_config(args.tiny)
    params = parameters_of(config)
    ours = "ours: one bf16 model (fp32 on CPU), LoRA, fused CE/KL"
    rows = [run(ours, bench_ours, config, device, args.steps, False),
            run("ours + gradient checkpointing", bench_ours, config, device, args.steps, True)]
    if not args.skip_official:
        rows.append(run("official: 2 × fp32 models, full logits", bench_official, config,
                        device, args.steps))
    rows.append(("official floor: 2 fp32 copies of the weights", f"{2 * 4 * params / 2**30:.1f}",
                 "—"))
    command = "python bench/bench_unlearn_step.py" + (" --tiny" if args.tiny else "")
    text = "\n".join([
        f"# SKU stage-1 step{' (tiny shape)' if args.tiny else ''}, {machine(device)}", "",
        f"- model: LLaMA-2-7B shape ({params / 1e9:.2f} B parameters)" if not args.tiny
        else f"- model: tiny LLaMA ({params / 1e6:.2f} M parameters)",
        f"- step: batch {BATCH} × {SEQ} tokens; per example 1 forget + {K} mismatch + 1 normal "
        f"row = {BATCH * (K + 2)} rows; LoRA r 32, α 16 on q_proj, v_proj; ε = {EPS}",
        f"- versions: {versions('torch', 'transformers', 'peft')}",
        f"- command: `{command}`; {args.steps} timed steps after 1 warm-up; "
        f"date {datetime.date.today()}", "",
        *table(["recipe", "peak GPU memory GiB", "tokens/s"], rows), ""])
    print(text)
    name = "unlearn_step_tiny.md" if args.tiny else "unlearn_step.md"
    write_results(RESULTS / name, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
