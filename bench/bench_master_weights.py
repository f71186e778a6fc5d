"""Memory of the three ways to run a bf16 full fine-tune with AdamW, per parameter and for an
OPT-2.7B-shaped model (the paper's full fine-tune recipe).

  pure bf16       bf16 parameters, gradients and AdamW state (what sku did before: updates
                  below half a bf16 step are rounded away)
  fp32 + autocast fp32 parameters, gradients and state, bf16 autocast (what sku unlearn does)
  bf16 + master   bf16 parameters and gradients, an fp32 master copy that AdamW steps, copied
                  back after each step (the other common choice)

Each runs two real AdamW steps on CPU on a smaller OPT (the dtype arithmetic is the same at
any size), each kind in a fresh process, and reports per parameter: the bytes of every tensor
kept between steps (parameters, optimizer state, master copy; gradients are freed after each
step, as sku's trainer does), and the peak RSS growth from building the model to the last step
(gradients, autocast's bf16 weight copies and the small batch's activations included). The
2.7B column scales the peak by the parameter count of OPT-2.7B's config (built on the meta
device, nothing downloaded); a real run's activations come on top, alike for all three.
The table is printed and written to bench/results/master_weights_cpu.md.

    python bench/bench_master_weights.py [--layers 12 --hidden 768]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys

import torch
from _common import RESULTS, machine, table, versions, write_results
from torch.nn.functional import cross_entropy

log = logging.getLogger("bench_master_weights")
OPT_2_7B = dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=50272, max_position_embeddings=2048)


def opt(hidden: int, layers: int, device: str = "cpu"):
    from transformers import OPTConfig, OPTForCausalLM

    shape = dict(OPT_2_7B, hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers,
                 num_attention_heads=max(1, hidden // 64))
    with torch.device(device):
        return OPTForCausalLM(OPTConfig(**shape, word_embed_proj_dim=hidden))


def kept_bytes(model, optimizer, masters=()) -> int:
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()
                                                 if p.grad is not None]
    tensors += [t for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0]
    tensors += [m for m in masters] + [m.grad for m in masters if m.grad is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(kind: str, hidden: int, layers: int, steps: int = 2) -> tuple[int, int, int]:
    torch.manual_seed(0)
    before = rss()
    # Built in its own dtype: no fp32 transient for the bf16 kinds.
    torch.set_default_dtype(torch.float32 if kind == "fp32 + autocast" else torch.bfloat16)
    model = opt(hidden, layers)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    masters = []
    trained = list(model.parameters())
    if kind != "fp32 + autocast":
        if kind == "bf16 + master":
            masters = [p.detach().float().requires_grad_() for p in model.parameters()]
            trained = masters
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    ids = torch.randint(0, OPT_2_7B["vocab_size"], (2, 64))
    for _ in range(steps):
        with torch.autocast("cpu", torch.bfloat16, enabled=kind == "fp32 + autocast"):
            logits = model(input_ids=ids).logits
        cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        for master, p in zip(masters, model.parameters(), strict=False):
            master.grad = p.grad.float()
            p.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # as sku's trainer does after every step
        for master, p in zip(masters, model.parameters(), strict=False):
            p.data.copy_(master.data)
    return params, kept_bytes(model, optimizer, masters), rss() - before


KINDS = ("pure bf16", "fp32 + autocast", "bf16 + master")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.one:
        print(json.dumps(run(args.one, args.hidden, args.layers)))
        return
    big = sum(p.numel() for p in opt(OPT_2_7B["hidden_size"], OPT_2_7B["num_hidden_layers"],
                                     "meta").parameters())
    rows, base = [], None
    for kind in KINDS:
        child = subprocess.run([sys.executable, __file__, "--one", kind, "--hidden",
                                str(args.hidden), "--layers", str(args.layers)],
                               capture_output=True, text=True, check=True)
        params, kept, growth = json.loads(child.stdout.splitlines()[-1])
        base = base or growth
        lost = "rounded away" if kind == "pure bf16" else "kept"
        rows.append([kind, f"{kept / params:.2f}", f"{growth / params:.2f}",
                     f"{growth / params * big / 2**30:.1f} GiB", f"{growth / base:.2f}", lost])
    text = "\n".join([
        "# bf16 full fine-tune memory, AdamW", "",
        f"`python bench/bench_master_weights.py --hidden {args.hidden} --layers {args.layers}`; "
        f"{machine()}; {versions('torch', 'transformers')}; measured on an OPT of hidden "
        f"{args.hidden}, {args.layers} layers, batch 2×64; OPT-2.7B shape: {big / 1e9:.2f}B "
        "parameters", "",
        *table(["method", "kept bytes / param", "peak RSS / param", "peak at 2.7B",
                "× pure bf16", "updates below half a bf16 step"], rows, right=range(1, 5)), ""])
    log.info(text)
    write_results(RESULTS / "master_weights_cpu.md", text)


if __name__ == "__main__":
    main()
