"""The demo's original model θ_o: a word-level tokenizer and a tiny LLaMA pre-trained on all
of the demo's data, and the mean loss of answers under a model (a judge-free check)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from sku.data.encoding import Encoded, answer_positions, encode, pad_batch, pad_id
from sku.data.readers import Pair
from sku.data.template import PAPER, PROMPT_TEMPLATE, Template
from sku.log import progress
from sku.train.model import final_hidden_states
from sku_kernels import linear_ce_kl
from taskvec import OutputDir

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
MAX_LENGTH = 64


def train_tokenizer(texts: list[str], folder: Path):
    """A word-level tokenizer over the texts (and the template), adding BOS like LLaMA's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    template = PROMPT_TEMPLATE.format(prompt="")
    tokenizer.train_from_iterator([template, *texts],
                                  trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", tokenizer.token_to_id("[BOS]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]",
                                   unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")
    fast.save_pretrained(folder)
    return fast


def pretrain(folder: Path, pairs: list[Pair], steps: int, seed: int = 0) -> None:
    """θ_o: a tiny LLaMA that learns every pair, prompt and answer, from random init. Its
    sequences end in EOS, so that its answers end (generation stops there); the unlearning
    rows keep the official template, without EOS. `folder` appears complete or not at all."""
    with OutputDir(folder, force=True) as tmp:
        _pretrain(tmp, pairs, steps, seed)


def _pretrain(folder: Path, pairs: list[Pair], steps: int, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer([text for p in pairs for text in (p.prompt, p.response)], folder)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    for _ in progress(range(steps), desc="pre-training"):
        encoded = [Encoded(e.input_ids[:MAX_LENGTH - 1] + [eos], e.answer_start)
                   for e in encode(tokenizer, rng.sample(pairs, 16), MAX_LENGTH)]
        input_ids, attention_mask = pad_batch(encoded, pad_id(tokenizer))
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)


@torch.no_grad()
def answer_loss(model_dir: Path, pairs: list[Pair], max_length: int = MAX_LENGTH,
                template: Template = PAPER) -> float:
    """Mean cross-entropy per answer token of the pairs under the model (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = encode(tokenizer, pairs, max_length, template)
    input_ids, attention_mask = pad_batch(encoded, pad_id(tokenizer))
    positions = [p for r, e in enumerate(encoded)
                 for p in answer_positions(e, r, input_ids.shape[1])]
    labels = [t for e in encoded for t in e.input_ids[e.answer_start:]]
    hidden = final_hidden_states(model, input_ids, attention_mask).flatten(0, 1)[positions]
    head = model.get_output_embeddings().weight
    return linear_ce_kl(hidden, head, torch.tensor(labels), reduction="mean").item()
