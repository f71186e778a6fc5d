"""How a prompt becomes the text before its answer: training rows, generation and perplexity all
go through one Template, recorded in run.json (`template`) and metrics.json.

  paper  the official SKU code's "### Question: {prompt}\\n ### Answer:", the answer after a
         space, the tokenizer's own special tokens (BOS) added; generation stops at the next
         "### Question:"
  chat   the tokenizer's chat template (an instruct model's own format): one user turn and the
         generation prompt, the answer right after it; the template writes its special tokens
         itself, so none are added; generation stops at the model's end of turn (EOS)
"""

from __future__ import annotations

from dataclasses import dataclass

from sku.errors import SkuError

PROMPT_TEMPLATE = "### Question: {prompt}\n ### Answer:"  # the response follows after a space


@dataclass(frozen=True)
class Template:
    name: str
    separator: str  # between the head and the answer
    add_special_tokens: bool  # when tokenising head + answer
    stop: str | None  # generated text from here on is not this answer

    def head(self, tokenizer, prompt: str) -> str:
        """The text before the answer."""
        if self.name == "paper":
            return PROMPT_TEMPLATE.format(prompt=prompt)
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)

    def check(self, tokenizer) -> None:
        """Refuses a tokenizer this template cannot use, before any model loads."""
        if self.name == "chat" and not getattr(tokenizer, "chat_template", None):
            raise SkuError(f"{tokenizer.name_or_path}: the tokenizer has no chat template "
                           "(use --template paper)")


PAPER = Template("paper", separator=" ", add_special_tokens=True, stop="### Question:")
CHAT = Template("chat", separator="", add_special_tokens=False, stop=None)
TEMPLATES = {t.name: t for t in (PAPER, CHAT)}
