"""Helpers for the sku tests: a tokenizer trained on the fixture text, tiny real models built
from configs (random init, seeded), a tiny BLEURT checkpoint, and running the sku CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import torch

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sku"
PKU_V1, PKU_V0 = FIXTURES / "pku_v1.jsonl", FIXTURES / "pku_v0.csv"
TRUTHFULQA, PLAIN = FIXTURES / "truthfulqa.csv", FIXTURES / "plain.jsonl"


def fixture_texts() -> list[str]:
    texts = []
    for line in PKU_V1.read_text().splitlines():
        row = json.loads(line)
        texts += [row["prompt"], row["response_0"], row["response_1"]]
    with open(TRUTHFULQA, newline="") as f:
        for row in csv.DictReader(f):
            texts += [row["Question"], row["Best Answer"], row["Correct Answers"]]
    return texts


def build_tokenizer(folder: Path, texts: list[str] | None = None, kind: str = "wordlevel"):
    """A fast tokenizer trained on `texts`: the demo's word-level one (whitespace and
    punctuation, BOS added like LLaMA's), or byte-level BPE (like GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sku.demo.tiny_model import SPECIAL_TOKENS, train_tokenizer

    texts = texts or fixture_texts()
    if kind == "wordlevel":
        return train_tokenizer(texts, folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]",
                                   unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")
    fast.save_pretrained(folder)
    return fast


def tiny_config(arch: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, bos_token_id=2, eos_token_id=3,
                           pad_token_id=0)
    if arch == "opt":  # word_embed_proj_dim < hidden_size: the body ends with project_out
        return OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128,
                         word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2,
                      eos_token_id=3)


@cache
def tiny_model(arch: str, root: Path) -> Path:
    """A saved tiny model with the fixture tokenizer: the original model θ_o of a test run."""
    from transformers import AutoModelForCausalLM

    folder = root / f"tiny-{arch}"
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)))
    model.save_pretrained(folder)
    return folder


def unlearn_args(method: str, model: Path, out: Path, *extra: str) -> list[str]:
    return ["unlearn", "--method", method, "--model", str(model), "--forget-data", str(PKU_V1),
            "--normal-data", str(TRUTHFULQA), "--out", str(out), "--max-steps", "4",
            "--batch-size", "2", "--k", "2", "--max-length", "64", "--lr", "1e-2", *extra]


def run_sku(*args: str, env: dict | None = None, timeout: float = 120,
            launcher: tuple[str, ...] = ("-m", "sku")) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess. On timeout, SIGTERM first: torchrun forwards it to its
    workers, which SIGKILL would leave running."""
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    command = [sys.executable, *launcher, *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=environment) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            stdout, stderr = proc.communicate(timeout=30)
            raise AssertionError(f"timed out after {timeout} s: {stderr[-2000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def byte_tokenizer():
    """GPT-2's byte-level pre-tokenizer with no merges: every byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")


BLEURT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the a cat dog sat on mat".split()]


def write_bleurt(folder, embedding_size=None):
    """A tiny checkpoint in bleurt-pytorch's layout: `bleurt.` weights, model_type bleurt."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForSequenceClassification

    folder.mkdir(parents=True)
    config = BertConfig(vocab_size=len(BLEURT_WORDS), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                        num_labels=1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(50.0)  # scores of order 1, so differences show
    state = {k.replace("bert.", "bleurt.", 1): v.contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    saved = {**config.to_dict(), "model_type": "bleurt", "embedding_size": embedding_size,
             "architectures": ["BleurtForSequenceClassification"]}
    (folder / "config.json").write_text(json.dumps(saved))
    (folder / "vocab.txt").write_text("\n".join(BLEURT_WORDS) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "tokenizer_class": "BleurtTokenizer"}))
    return model


def assert_sku_error(proc: subprocess.CompletedProcess, *needles: str,
                     only_line: bool = True) -> str:
    """Exit 1 and no traceback; the last stderr line is `sku: error: …` holding every needle
    (with only_line, it is the only line: nothing was logged, so nothing had started)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("sku: error: "), proc.stderr[-3000:]
    assert not only_line or len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]
