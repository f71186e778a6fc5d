"""Utility metrics (paper appendix A.2): perplexity of generated responses under a reference
causal LM, and BLEURT between the unlearned and the original model's responses.

Both take a hub id or a local folder; an id is looked up in the local Hugging Face cache only
(no download at run time). A metric whose model cannot be had raises MetricUnavailable, whose
message the evaluation records as "not computed: <why>".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sku.data.template import PAPER, Template
from sku.errors import SkuError, loading
from sku.log import progress

# The paper's reference LM is "GPT-2 pretrained on Wiki-103", which is not on the hub; OpenAI's
# GPT-2 (WebText) is the nearest offline stand-in (sku/DEPARTURES.md). Any local folder works.
DEFAULT_PPL_MODEL = "openai-community/gpt2"
DEFAULT_BLEURT = "lucadiliello/bleurt-base-128"  # original BLEURT scale, as the paper's scores


class MetricUnavailable(SkuError):
    """A metric's model is not available offline or is not supported."""


def resolve_local(name_or_path: str, role: str) -> Path:
    import taskvec

    try:
        return taskvec.resolve(name_or_path, role)
    except taskvec.TaskVecError as e:
        raise MetricUnavailable(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Perplexity


@dataclass(frozen=True)
class Perplexity:
    """Two aggregates of one set of responses. `mean` is the paper's eq. 9 per response,
    averaged (HF evaluate's `mean_perplexity`); `corpus` pools every token. A response with no
    token to score (an empty one) has no perplexity (eq. 9 divides by zero): it is counted in
    `empty`, a degenerate outcome the report shows, and is left out of both aggregates rather
    than averaged in as some number."""

    corpus: float | None  # exp(Σ NLL / Σ tokens) over every scored token of every response
    mean: float | None  # mean over the scored responses of each one's own perplexity
    per_sample: list[float | None]  # None for a response with no token to score
    tokens: int
    truncated: int  # responses cut at the reference model's context length

    @property
    def empty(self) -> int:
        return sum(p is None for p in self.per_sample)


def repetitive(response: str) -> bool:
    """A degenerate response that is not empty: a loop ("EL EL EL …", a sentence again and
    again), which a reference LM finds easy to predict, so its perplexity is low and hides
    the degeneration. Repeated word 4-grams make up half of it (natural text has almost none),
    or, in under 8 words, each word comes 3 times on average; or one run of a few characters
    ("!!!!!!!!"). Repetition is measured, not a list of strings, so any model's loop counts."""
    words = response.split()
    if len(words) >= 8:
        grams = list(zip(*(words[i:] for i in range(4)), strict=False))
        return len(set(grams)) <= len(grams) / 2
    if len(words) >= 3:
        return len(set(words)) * 3 <= len(words)
    text = "".join(words)
    return len(text) >= 8 and len(set(text)) <= 2


CONDITIONING = {
    "none": "each response alone, after the reference model's BOS (or EOS) token",
    "prompt": "each response after its prompt, in the run's template",
}


class ReferenceLM:
    """A causal LM that scores texts: `perplexity(responses, prompts=None)`."""

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = resolve_local(name_or_path, "perplexity model")
        with loading(name_or_path, "it as a causal LM", MetricUnavailable):
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        self.model.to(device).eval()
        self.name, self.device = name_or_path, torch.device(device)
        config = self.model.config
        self.max_length = (getattr(config, "max_position_embeddings", None)
                           or getattr(config, "n_positions", None) or 1024)
        tok = self.tokenizer
        self.start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def _rows(self, responses: Sequence[str], prompts: Sequence[str] | None,
              template: Template):
        """(token ids, index of the first scored position, truncated?) per response."""
        tokenize = self.tokenizer
        start = [] if self.start_id is None else [self.start_id]
        for i, response in enumerate(responses):
            if prompts is None:
                context, text = start, response
            else:  # a chat template writes its own start tokens
                head = template.head(tokenize, prompts[i])
                context = ((start if template.add_special_tokens else [])
                           + tokenize(head, add_special_tokens=False)["input_ids"])
                text = template.separator + response
            answer = tokenize(text, add_special_tokens=False)["input_ids"] if response else []
            ids = (context + answer)[:self.max_length]
            # The first token has no left context without a start token: it cannot be scored.
            first = max(len(context), 1)
            yield ids, first, len(context) + len(answer) > self.max_length

    @torch.no_grad()
    def perplexity(self, responses: Sequence[str], prompts: Sequence[str] | None = None,
                   batch_size: int = 8, desc: str | None = "perplexity",
                   template: Template = PAPER) -> Perplexity:
        """Perplexity of each response (after its templated prompt, when given); `desc`
        names its progress bar, None shows none."""
        rows = list(self._rows(responses, prompts, template))
        nll = [0.0] * len(rows)
        counts = [max(0, len(ids) - first) for ids, first, _ in rows]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # less padding
        scored = [i for i in order if counts[i]]
        for b in progress(range(0, len(scored), batch_size), desc=desc, disable=desc is None):
            batch = scored[b:b + batch_size]
            width = max(len(rows[i][0]) for i in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            attention = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for r, i in enumerate(batch):
                ids, first, _ = rows[i]
                input_ids[r, :len(ids)] = torch.tensor(ids)
                attention[r, :len(ids)] = 1
                labels[r, first:len(ids)] = torch.tensor(ids[first:])
            logits = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=attention.to(self.device)).logits.float()
            targets = labels[:, 1:].to(self.device)
            token_nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none")
            token_nll = token_nll.masked_fill(targets < 0, 0.0).double().sum(dim=1)
            for r, i in enumerate(batch):
                nll[i] = token_nll[r].item()
        per_sample = [math.exp(n / c) if c else None for n, c in zip(nll, counts, strict=True)]
        total = sum(counts)
        known = [p for p in per_sample if p is not None]
        return Perplexity(
            corpus=math.exp(sum(nll) / total) if total else None,
            mean=sum(known) / len(known) if known else None,
            per_sample=per_sample, tokens=total,
            truncated=sum(truncated for _, _, truncated in rows))


# ---------------------------------------------------------------------------------------------
# BLEURT


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise MetricUnavailable(f"{folder}: no model.safetensors or pytorch_model.bin")


class Bleurt:
    """BLEURT checkpoints in the PyTorch format of bleurt-pytorch (lucadiliello/bleurt-*): a BERT
    encoder whose pooled [CLS] state a linear layer maps to the score. Loaded into transformers'
    own BertForSequenceClassification, since bleurt-pytorch 0.0.1 does not import with
    transformers 5. The RemBERT-based BLEURT-20 family is not supported."""

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu"):
        from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

        folder = resolve_local(name_or_path, "BLEURT checkpoint")
        try:
            settings = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MetricUnavailable(f"{folder}: no readable config.json ({e})") from None
        if settings.get("model_type") != "bleurt":
            raise MetricUnavailable(f"{folder}: not a BLEURT checkpoint (model_type "
                                    f"{settings.get('model_type')!r}, expected 'bleurt')")
        if settings.get("embedding_size") not in (None, settings.get("hidden_size")):
            raise MetricUnavailable(f"{folder}: BLEURT-20 (RemBERT) checkpoints are not "
                                    "supported; use a bleurt-{tiny,base,large}-{128,512} one")
        ignored = {"model_type", "architectures", "embedding_size", "transformers_version"}
        fields = {k: v for k, v in settings.items() if k not in ignored}
        config = BertConfig(**{**fields, "num_labels": 1})
        model = BertForSequenceClassification(config)
        state = {k.replace("bleurt.", "bert.", 1): v for k, v in _read_state_dict(folder).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
        unexpected = [k for k in unexpected if not k.endswith(("position_ids", "token_type_ids"))]
        if missing or unexpected:
            raise MetricUnavailable(f"{folder}: weights do not match a BLEURT model "
                                    f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
        with loading(folder, "its WordPiece tokenizer", MetricUnavailable):
            self.tokenizer = BertTokenizer.from_pretrained(folder)
        self.model = model.to(device).eval()
        self.name, self.device = name_or_path, torch.device(device)
        self.max_length = config.max_position_embeddings

    @torch.no_grad()
    def score(self, references: Sequence[str], candidates: Sequence[str],
              batch_size: int = 16) -> list[float]:
        """BLEURT(reference, candidate) for each pair: [CLS] reference [SEP] candidate [SEP]."""
        if len(references) != len(candidates):
            raise SkuError(f"BLEURT: {len(references)} references but "
                           f"{len(candidates)} candidates")
        scores: list[float] = []
        for b in range(0, len(references), batch_size):
            batch = self.tokenizer(list(references[b:b + batch_size]),
                                   list(candidates[b:b + batch_size]), padding=True,
                                   truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(self.device)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores
