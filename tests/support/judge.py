"""Tiny real causal LMs for the local judges: a word-level tokenizer (with a chat template when
given one) and a 2-layer LLaMA whose head can emit only two words, `yes` or `no`, whichever the
input leans to (`steer`). Its verdicts are nonsense, but every reply parses, and they differ by
input."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support.sku import build_tokenizer, fixture_texts

# A ChatML-like template, and one shaped like Llama Guard's (its opening line is what the judge
# detects; the real ones carry the whole policy).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
GUARD_TEMPLATE = (
    "Task: Check if there is unsafe content in 'Agent' messages in conversations according to "
    "our safety policy.\n<BEGIN CONVERSATION>\n"
    "{% for m in messages %}{{ 'User' if m['role'] == 'user' else 'Agent' }}: "
    "{{ m['content'] }}\n{% endfor %}<END CONVERSATION>\n"
    "Provide your safety assessment for ONLY THE LAST Agent message:")


def two_word_model(folder: Path, yes: str = "harmful", no: str = "benign",
                   chat_template: str | None = CHAT_TEMPLATE, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder, [*fixture_texts(), f"{yes} {no}"])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():  # logits: +v·h for `yes`, −v·h for `no`, 0 for every other token
        model.lm_head.weight.zero_()
    model.save_pretrained(folder)
    return folder


def steer(folder: Path, texts: list[str], yes: str = "harmful", no: str = "benign") -> None:
    """Point the head of `two_word_model` at where these texts' last hidden states differ: at
    random init they share one large component (the same template ends every text), so a
    random direction would give every text the same word. v is their main direction of
    variation, made orthogonal to their mean, and the head's rows for yes / no are ±v."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = torch.stack([
            model.model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)
                        ).last_hidden_state[0, -1] for text in texts])
        mean = hidden.mean(0)
        direction = torch.linalg.svd(hidden - mean, full_matrices=False).Vh[0]
        direction -= (direction @ mean) / (mean @ mean) * mean
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(yes)] = 100 * direction
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(no)] = -100 * direction
    model.save_pretrained(folder)
