"""Responses of a model to prompts in the run's template, with fixed decoding settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sku.data.template import PAPER, Template
from sku.dtypes import default_device, resolve_dtype
from sku.errors import SkuError, loading
from sku.log import progress
from sku.settings import BOOL, INT, NUMBER, POSITIVE_INT, POSITIVE_NUMBER, Check, setting


@dataclass(frozen=True)
class Decoding:
    """Fixed generation settings, recorded in metrics.json (greedy by default)."""

    max_new_tokens: int = setting(128, "most tokens generated per response",
                                  check=POSITIVE_INT)
    do_sample: bool = setting(False, "sample instead of greedy decoding", check=BOOL,
                              action="store_true")
    temperature: float = setting(1.0, "sampling temperature", check=POSITIVE_NUMBER)
    top_p: float = setting(1.0, "nucleus sampling: the smallest set of tokens of this mass",
                           check=Check(lambda v: NUMBER.ok(v) and 0 < v <= 1,
                                       "a number in (0, 1]"))
    seed: int = setting(0, "seed of sampling", check=INT)
    batch_size: int = setting(8, "prompts per generate call", check=POSITIVE_INT)


def load_generator(folder: Path, adapter: Path | None, tokenizer_folder: Path, dtype_name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = default_device()
    dtype = resolve_dtype(dtype_name, device)
    with loading(adapter or folder, "the model"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.to(device).eval(), tokenizer


def release(model) -> None:
    """Free a model's memory before the next one loads (one model at a time)."""
    import gc

    import torch

    model.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate(model, tokenizer, prompts: list[str], decoding: Decoding,
             template: Template = PAPER, desc: str = "generating") -> list[str]:
    """Responses to `prompts` in `template` (the run's), in batches sorted by length. A model
    never generates past its context length (n_positions or max_position_embeddings)."""
    import torch

    torch.manual_seed(decoding.seed)
    texts = [template.head(tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    responses = [""] * len(texts)
    sampling = ({"temperature": decoding.temperature, "top_p": decoding.top_p}
                if decoding.do_sample else {})
    device = next(model.parameters()).device
    config = model.config
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings",
                                                               None)
    for b in progress(range(0, len(order), decoding.batch_size), desc=desc):
        batch = order[b:b + decoding.batch_size]
        inputs = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                           add_special_tokens=template.add_special_tokens)
        width = inputs["input_ids"].shape[1]
        room = context - width if context else decoding.max_new_tokens
        if room <= 0:
            raise SkuError(f"a prompt of {width} tokens fills the model's context ({context})")
        with torch.no_grad():
            output = model.generate(**inputs.to(device),
                                    max_new_tokens=min(decoding.max_new_tokens, room),
                                    do_sample=decoding.do_sample,
                                    pad_token_id=tokenizer.pad_token_id, **sampling)
        new_tokens = output[:, width:]
        for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True),
                           strict=True):
            responses[i] = (text.split(template.stop)[0] if template.stop else text).strip()
    return responses
